"""`kubedistill doctor`: DistillationJobs holding kubedistill's finalizer that no operator may remove, and
the way out (`--release-finalizers`). The chart's pre-delete hook runs it at `helm uninstall`.

Pure functions decide (what each held job is, what releasing it does to its artifacts); a thin layer
below them talks to the cluster through the `kubernetes` client and to the artifact store.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubedistill import store
from kubedistill.api.models import GROUP, VERSION, DistillationJob
from kubedistill.builders import artifact_root
from kubedistill.domain.conditions import parse_time, rfc3339
from kubedistill.domain.deletion import FINALIZER, deletes_artifacts, has_finalizer
from kubedistill.domain.naming import artifact_base
from kubedistill.domain.uri_policy import job_violations, resolve
from kubedistill.settings import Settings

PLURAL = "distillationjobs"
# An operator finishes a deletion in seconds; one still pending after this is taken as stuck.
STUCK_AFTER_S = 60.0
REPORTER = "kubedistill-doctor"


# ------------------------------------------------------------------------------------ pure


@dataclass(frozen=True)
class Held:
    """A DistillationJob carrying kubedistill's finalizer."""

    namespace: str
    name: str
    uid: str
    deleting_since: datetime | None
    deletes_artifacts: bool
    # Where its artifacts live, when the job and the settings say (None: unknown here).
    artifacts: str | None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def held_jobs(bodies: Iterable[Mapping[str, Any]], settings: Settings) -> list[Held]:
    """The jobs carrying the finalizer, sorted by namespace and name."""
    held = []
    for body in bodies:
        if not has_finalizer(body):
            continue
        meta = body["metadata"]
        held.append(
            Held(
                namespace=meta.get("namespace") or "default",
                name=meta["name"],
                uid=meta.get("uid") or "",
                deleting_since=parse_time(meta.get("deletionTimestamp")),
                deletes_artifacts=deletes_artifacts(body),
                artifacts=artifact_location(body, settings),
            )
        )
    return sorted(held, key=lambda h: (h.namespace, h.name))


def artifact_location(body: Mapping[str, Any], settings: Settings) -> str | None:
    """Where the job's artifacts are, if inside its namespace's storage scope (None: nothing to delete).

    Scopes chosen by namespace label are not resolved here (no namespace read): such jobs' artifacts are
    left behind, with the event saying where, rather than deleted with the wrong scope.
    """
    try:
        job = DistillationJob.model_validate(body)
        scoped, policy = resolve(settings, job.metadata.namespace or "default", {})
        root = artifact_root(job, scoped)
    except (ValidationError, ValueError):
        return None
    if job_violations(job, policy, root):
        return None
    meta = job.metadata
    return artifact_base(root, meta.namespace or "default", meta.name, meta.uid or "")


def diagnose(held: Held, now: datetime) -> str:
    """Why the finalizer is there, and whether an operator is evidently not removing it."""
    if not held.deletes_artifacts:
        reason = "not needed (left by an older operator; a running operator removes it)"
    else:
        reason = "spec.storage.deleteOnJobDeletion: the operator deletes the artifacts, then removes it"
    if held.deleting_since is None:
        return reason
    waited = (now - held.deleting_since).total_seconds()
    if waited < STUCK_AFTER_S:
        return f"being deleted for {waited:.0f}s; {reason}"
    return (
        f"STUCK: deleted {rfc3339(held.deleting_since)} and no operator has removed the finalizer; {reason}"
    )


@dataclass(frozen=True)
class Outcome:
    held: Held
    # What became of the job's artifacts, for the jobs that asked for their deletion.
    artifacts: str | None
    # Whether they are left behind although the job asked for them to go (then `artifacts` says why).
    left_behind: bool = False


def artifacts_plan(held: Held, delete_artifacts: bool) -> str | None:
    """What releasing the job skips, before anything is done: None when it skips nothing."""
    if not held.deletes_artifacts:
        return None
    where = held.artifacts or "an unknown location (no artifact storage is configured here)"
    if held.deleting_since is None:
        return f"artifacts at {where} will stay when the job is deleted: no operator is left to delete them"
    if not delete_artifacts:
        return f"artifacts at {where} are left behind (artifact deletion skipped: no --delete-artifacts)"
    return None


# -------------------------------------------------------------------------------------- I/O


def list_jobs(api: Any, namespaces: Sequence[str]) -> list[dict[str, Any]]:
    """Every DistillationJob in these namespaces (all of them when none is named)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    if not namespaces:
        found = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        return list(found.get("items", []))
    items: list[dict[str, Any]] = []
    for namespace in namespaces:
        items += custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL).get("items", [])
    return items


def release_finalizer(api: Any, held: Held, body: Mapping[str, Any]) -> None:
    """Take our finalizer out, leaving any other; the `test` makes a concurrent change fail, not vanish."""
    from kubernetes import client

    finalizers = list(body["metadata"].get("finalizers") or [])
    patch = [
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": [f for f in finalizers if f != FINALIZER]},
    ]
    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, held.namespace, PLURAL, held.name, patch, _content_type="application/json-patch+json"
    )


def post_event(api: Any, held: Held, reason: str, message: str, now: datetime) -> None:
    from kubernetes import client

    stamp = rfc3339(now)
    client.CoreV1Api(api).create_namespaced_event(
        held.namespace,
        {
            "metadata": {"generateName": f"{held.name}.", "namespace": held.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "DistillationJob",
                "name": held.name,
                "namespace": held.namespace,
                "uid": held.uid,
            },
            "type": "Warning",
            "reason": reason,
            "message": message[:1024],
            "source": {"component": REPORTER},
            "reportingComponent": REPORTER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        },
    )


def delete_artifacts(held: Held) -> str:
    """Delete a deleted job's artifacts; what happened, in words. Raises StoreError/ValueError."""
    if held.artifacts is None:
        raise ValueError(
            "no artifact storage is configured here (KUBEDISTILL_STORAGE_BUCKET or _ARTIFACT_ROOT)"
        )
    deleted = store.delete_prefix(held.artifacts + "/")
    return f"deleted {deleted} artifact object(s) under {held.artifacts}"


def release_all(
    api: Any,
    bodies: Sequence[Mapping[str, Any]],
    settings: Settings,
    *,
    delete: bool,
    now: datetime,
) -> list[Outcome]:
    """Release every held job; a deleted job's artifacts are deleted first when `delete` says so. Jobs whose
    artifacts stay although they asked for their deletion get a Warning event saying where and why."""
    by_ref = {f"{b['metadata'].get('namespace') or 'default'}/{b['metadata']['name']}": b for b in bodies}
    outcomes = []
    for held in held_jobs(bodies, settings):
        left_behind = artifacts_plan(held, delete)
        note = left_behind
        if held.deletes_artifacts and left_behind is None:
            try:
                note = delete_artifacts(held)
            except (store.StoreError, ValueError) as err:
                where = held.artifacts or "an unknown location"
                note = left_behind = f"artifacts at {where} left behind: {err}"
        if left_behind is not None:
            post_event(api, held, "ArtifactsLeftBehind", left_behind, now)
        release_finalizer(api, held, by_ref[held.ref])
        outcomes.append(Outcome(held, note, left_behind=left_behind is not None))
    return outcomes


def stop_deployment(api: Any, namespace: str, name: str, timeout_s: float = 120.0) -> None:
    """Scale the operator's Deployment to zero and wait until its pods are gone, so that no operator
    puts a finalizer back on a job after it was released."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    try:
        deployment = apps.read_namespaced_deployment(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return  # no operator to stop
        raise
    labels = deployment.spec.selector.match_labels or {}
    if not labels:
        raise ValueError(f"deployment {namespace}/{name} selects its pods without matchLabels")
    apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    deadline = time.monotonic() + timeout_s
    while core.list_namespaced_pod(namespace, label_selector=selector).items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pods of deployment {namespace}/{name} did not stop in {timeout_s:.0f}s")
        time.sleep(1.0)
