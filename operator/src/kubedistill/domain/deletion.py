"""Deleting a DistillationJob: which jobs carry the finalizer, and what a deletion still waits for.

Stage Jobs carry an owner reference to their DistillationJob, so the garbage collector deletes them
(and their pods) without the operator. The finalizer only does work when `spec.storage.deleteOnJobDeletion`
asks for the artifacts to go with the job: it holds the job until its stage pods have stopped writing
and the artifacts are deleted. Every other job has no finalizer, so it can always be deleted, with or
without an operator running. Pure: the operator, `kubedistill doctor` and the Helm hook share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubedistill.api.models import GROUP

FINALIZER = f"{GROUP}/finalizer"
# The spec field that decides it, as kopf's field filter spells it.
DELETE_ARTIFACTS_FIELD = "spec.storage.deleteOnJobDeletion"
MAX_NAMES = 5


def deletes_artifacts(body: Mapping[str, Any]) -> bool:
    """Whether the job asks for its artifacts to be deleted with it: the only reason for a finalizer."""
    storage = (body.get("spec") or {}).get("storage") or {}
    return storage.get("deleteOnJobDeletion") is True


def has_finalizer(body: Mapping[str, Any]) -> bool:
    return FINALIZER in ((body.get("metadata") or {}).get("finalizers") or [])


def is_deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:MAX_NAMES])
    return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


def terminating_message(jobs: Sequence[str], pods: Sequence[str]) -> str:
    """What a deleted job waits for before its artifacts can be deleted."""
    if pods:
        return (
            f"{len(pods)} stage pod(s) still terminating ({_names(pods)}); "
            "the artifacts are deleted once they have stopped"
        )
    return f"{len(jobs)} stage Job(s) still being deleted ({_names(jobs)})"
