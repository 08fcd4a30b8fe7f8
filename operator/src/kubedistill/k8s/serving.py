"""API calls of the serve path: model servers, the gateway's objects, provider keys. Thin on purpose."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from kubedistill.builders.model_server import LABEL_ALIAS, LABEL_VERSION
from kubedistill.domain.naming import LABEL_MANAGED_BY, MANAGED_BY, label_value
from kubedistill.domain.serving import ServerState
from kubedistill.k8s.client import ApiError, Kube
from kubedistill.k8s.resources import get_or_none

APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "kubedistill"
_PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
}
# A pod waiting for one of these will not get better by itself: the swap stops and says so.
_STUCK = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def _collection(kind: str, namespace: str) -> str:
    return _PATHS[kind].format(ns=namespace)


async def apply(kube: Kube, manifest: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply: create or bring up to date, owning only the fields we set."""
    meta = manifest["metadata"]
    return await kube.request(
        "PATCH",
        f"{_collection(manifest['kind'], meta['namespace'])}/{meta['name']}",
        body=manifest,
        content_type=APPLY_PATCH,
        params={"fieldManager": FIELD_MANAGER, "force": "true"},
    )


async def delete(kube: Kube, kind: str, namespace: str, name: str) -> None:
    try:
        await kube.request("DELETE", f"{_collection(kind, namespace)}/{name}")
    except ApiError as err:
        if err.status != 404:
            raise


async def get(kube: Kube, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    return await get_or_none(kube, f"{_collection(kind, namespace)}/{name}")


async def read_secret_value(kube: Kube, namespace: str, name: str, key: str) -> str | None:
    """One provider key, to copy into the gateway's keys Secret (never logged, never in status)."""
    secret = await get_or_none(kube, f"/api/v1/namespaces/{namespace}/secrets/{name}")
    encoded = ((secret or {}).get("data") or {}).get(key)
    return base64.b64decode(encoded).decode() if encoded is not None else None


def _selector(alias: str) -> str:
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_ALIAS}={label_value(alias)}"


def _pod_problem(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, the pod's own message) when a pod of a model server cannot become Ready."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
            return "Unschedulable", cond.get("message") or "Unschedulable"
    for reason, key in (("FetchFailed", "initContainerStatuses"), ("ServerNotReady", "containerStatuses")):
        for cs in status.get(key) or []:
            state, last = cs.get("state") or {}, cs.get("lastState") or {}
            terminated = state.get("terminated") or last.get("terminated") or {}
            waiting = state.get("waiting") or {}
            failed = terminated and terminated.get("exitCode", 0) != 0
            if failed or waiting.get("reason") in _STUCK:
                words = terminated.get("message") or waiting.get("message") or waiting.get("reason")
                return reason, f"{cs.get('name')}: {str(words or 'exited').strip()[-1000:]}"
    if status.get("phase") == "Failed":
        return "ServerNotReady", status.get("message") or "pod failed"
    return None


def server_states(
    deployments: Sequence[dict[str, Any]], pods: Sequence[dict[str, Any]]
) -> dict[str, ServerState]:
    """Each model server by name: ready replicas and, when no replica is ready, why not."""
    states: dict[str, ServerState] = {}
    for dep in deployments:
        meta = dep.get("metadata") or {}
        version = (meta.get("labels") or {}).get(LABEL_VERSION)
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        problem = None
        if ready == 0 and meta.get("deletionTimestamp") is None:
            mine = [
                p
                for p in pods
                if ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_VERSION) == version
            ]
            problem = next((found for p in mine if (found := _pod_problem(p)) is not None), None)
        states[meta["name"]] = ServerState(
            ready_replicas=ready,
            failure_reason=problem[0] if problem else None,
            failure_message=problem[1] if problem else None,
        )
    return states


async def observe_servers(kube: Kube, namespace: str, alias: str) -> dict[str, ServerState]:
    params = {"labelSelector": _selector(alias)}
    deployments = await kube.request("GET", _collection("Deployment", namespace), params=params)
    pods = await kube.request("GET", f"/api/v1/namespaces/{namespace}/pods", params=params)
    return server_states(deployments.get("items") or [], pods.get("items") or [])


async def delete_server(kube: Kube, namespace: str, name: str) -> None:
    await delete(kube, "Service", namespace, name)
    await delete(kube, "Deployment", namespace, name)
