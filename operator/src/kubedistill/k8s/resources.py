"""Every API call the operator makes, one small function each."""

from __future__ import annotations

from typing import Any

from kubedistill.api.models import GROUP, VERSION
from kubedistill.domain.naming import child_selector
from kubedistill.k8s.client import JSON_PATCH, MERGE_PATCH, METADATA_ONLY, ApiError, Kube

DJ_PLURAL = "distillationjobs"
ALIAS_PLURAL = "modelaliases"


def _custom(namespace: str, plural: str, name: str | None = None, sub: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
    if sub is not None:
        path += f"/{sub}"
    return path


def _path(manifest: dict[str, Any]) -> str:
    kind, namespace = manifest["kind"], manifest["metadata"]["namespace"]
    if kind == "Job":
        return f"/apis/batch/v1/namespaces/{namespace}/jobs"
    if kind == "ConfigMap":
        return f"/api/v1/namespaces/{namespace}/configmaps"
    if kind == "ModelAlias":
        return _custom(namespace, ALIAS_PLURAL)
    raise ValueError(f"no path known for kind {kind}")


async def get_or_none(kube: Kube, path: str, **kwargs: Any) -> dict[str, Any] | None:
    try:
        return await kube.request("GET", path, **kwargs)
    except ApiError as err:
        if err.status == 404:
            return None
        raise


async def create(kube: Kube, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create, or read what is already there under that name (a retry or a restart): (object, created)."""
    collection = _path(manifest)
    try:
        return await kube.request("POST", collection, body=manifest), True
    except ApiError as err:
        if err.status != 409:
            raise
    existing = await get_or_none(kube, f"{collection}/{manifest['metadata']['name']}")
    if existing is None:  # deleted between our POST and GET: the next reconcile creates it again
        raise ApiError(409, "AlreadyExists", f"{manifest['metadata']['name']} exists but could not be read")
    return existing, False


async def get_distillation_job(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    return await get_or_none(kube, _custom(namespace, DJ_PLURAL, name))


async def patch_distillation_job_status(
    kube: Kube, namespace: str, name: str, status: dict[str, Any]
) -> dict[str, Any]:
    return await kube.request(
        "PATCH",
        _custom(namespace, DJ_PLURAL, name, "status"),
        body={"status": status},
        content_type=MERGE_PATCH,
    )


async def list_child_jobs(kube: Kube, namespace: str, job: str) -> list[dict[str, Any]]:
    found = await kube.request(
        "GET", f"/apis/batch/v1/namespaces/{namespace}/jobs", params={"labelSelector": child_selector(job)}
    )
    items: list[dict[str, Any]] = found.get("items", [])
    return items


async def list_child_pods(kube: Kube, namespace: str, job: str) -> list[dict[str, Any]]:
    found = await kube.request(
        "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": child_selector(job)}
    )
    items: list[dict[str, Any]] = found.get("items", [])
    return items


async def set_job_suspend(kube: Kube, namespace: str, name: str, suspend: bool) -> None:
    await kube.request(
        "PATCH",
        f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
        body={"spec": {"suspend": suspend}},
        content_type=MERGE_PATCH,
    )


async def delete_job(kube: Kube, namespace: str, name: str) -> None:
    """Delete a child Job in the foreground: it stays listed until its pods are gone, so "no children
    left" also means no stage process is still writing artifacts."""
    try:
        await kube.request(
            "DELETE",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"},
        )
    except ApiError as err:
        if err.status != 404:
            raise


async def secret_exists(kube: Kube, namespace: str, name: str) -> bool:
    """Whether the Secret exists, asking for its metadata only: the operator never reads secret values.

    A 403 counts as "exists": a cluster-wide install may not read Secrets everywhere (the chart's
    rbac.secretNamespaces), and then a missing Secret shows on the stage Pod instead of up front.
    """
    try:
        found = await get_or_none(
            kube, f"/api/v1/namespaces/{namespace}/secrets/{name}", accept=METADATA_ONLY
        )
    except ApiError as err:
        if err.status == 403:
            return True
        raise
    return found is not None


async def get_configmap(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    return await get_or_none(kube, f"/api/v1/namespaces/{namespace}/configmaps/{name}")


async def get_alias(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    return await get_or_none(kube, _custom(namespace, ALIAS_PLURAL, name))


async def list_aliases(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await kube.request("GET", _custom(namespace, ALIAS_PLURAL))).get(
        "items", []
    )
    return items


async def replace_alias_field(
    kube: Kube, namespace: str, name: str, field: str, value: dict[str, Any]
) -> dict[str, Any]:
    # A JSON patch sets the target (or canary) as a whole, so fields of the previous one cannot linger;
    # "add" replaces a member that exists and creates one that does not.
    return await kube.request(
        "PATCH",
        _custom(namespace, ALIAS_PLURAL, name),
        body=[{"op": "add", "path": f"/spec/{field}", "value": value}],
        content_type=JSON_PATCH,
    )


async def annotate_alias(kube: Kube, namespace: str, name: str, annotations: dict[str, str]) -> None:
    await kube.request(
        "PATCH",
        _custom(namespace, ALIAS_PLURAL, name),
        body={"metadata": {"annotations": annotations}},
        content_type=MERGE_PATCH,
    )


async def patch_alias_status(kube: Kube, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    return await kube.request(
        "PATCH",
        _custom(namespace, ALIAS_PLURAL, name, "status"),
        body={"status": status},
        content_type=MERGE_PATCH,
    )
