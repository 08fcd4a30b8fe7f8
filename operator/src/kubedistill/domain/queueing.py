"""Stage Jobs under Kueue: which queue a job uses, how to stop and resume its queued Jobs, and what the
DistillationJob says while Kueue holds one.

A stage Job with the `kueue.x-k8s.io/queue-name` label is Kueue's: it is created suspended and Kueue
alone flips `spec.suspend` (on admission, eviction, preemption). The operator never patches such a
Job — overriding Kueue's suspend or rewriting a managed Job's spec is what Kueue #1726 and #6915 show
going wrong. `spec.suspend` of the DistillationJob stops a queued stage the way Kueue documents:
the Workload's `spec.active: false`, which evicts it and lets Kueue suspend the Job; resuming sets it
back, only on Workloads the operator deactivated itself (Kueue deactivates some on its own).
"""

from __future__ import annotations

from typing import Any

from kubedistill.domain.actions import Action, SetSuspend, SetWorkloadActive
from kubedistill.domain.observation import ChildJob, WorkloadSummary

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue labels each Workload with the uid of the Job it stands for.
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
DEACTIVATED_ANNOTATION = "kubedistill.io/deactivated-for-suspend"
# Our reasons where Kueue has not spoken yet; otherwise the Workload's condition reason is passed on.
NO_WORKLOAD = "WorkloadPending"
# A Workload Kueue has not judged yet (no QuotaReserved condition).
NOT_YET_CONSIDERED = "AwaitingAdmission"
ADMITTED = "Admitted"


def queue_name(spec_queue: str | None, default_queue: str | None) -> str | None:
    return spec_queue or default_queue


def _condition(workload: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions = (workload.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), None)


def summarise_workload(workload: dict[str, Any]) -> WorkloadSummary:
    """Reduce a kueue.x-k8s.io Workload to admission and Kueue's reason for holding it."""
    meta = workload.get("metadata") or {}
    active = (workload.get("spec") or {}).get("active") is not False
    admitted = _condition(workload, "Admitted")
    reserved = _condition(workload, "QuotaReserved")
    evicted = _condition(workload, "Evicted")
    is_admitted = admitted is not None and admitted.get("status") == "True"
    # The most specific word Kueue has: why it evicted, why no quota, or what admission still waits for.
    said = next(
        (
            c
            for c in (evicted, reserved, admitted)
            if c is not None and c.get("status") == ("True" if c is evicted else "False")
        ),
        None,
    )
    return WorkloadSummary(
        name=meta.get("name", ""),
        active=active,
        deactivated_by_operator=not active and DEACTIVATED_ANNOTATION in (meta.get("annotations") or {}),
        admitted=is_admitted,
        reason=(said or {}).get("reason") or None,
        message=(said or {}).get("message") or None,
    )


def held(child: ChildJob) -> tuple[str, str] | None:
    """(Kueue's reason, message) while Kueue holds this queued Job; None once it runs or was stopped by us."""
    if child.queue is None or child.finished or not child.suspended:
        return None
    workload = child.workload
    if workload is None:
        return NO_WORKLOAD, (
            f"Job {child.name} waits in LocalQueue {child.queue} for Kueue to create its Workload "
            "(is Kueue running with the batch/job integration?)"
        )
    if workload.deactivated_by_operator or workload.admitted:
        return None
    detail = workload.message or "waiting for quota"
    return (
        workload.reason or NOT_YET_CONSIDERED,
        f"Job {child.name} queued in LocalQueue {child.queue} (Workload {workload.name}): {detail}",
    )


def admitted(child: ChildJob) -> bool:
    return child.queue is not None and (
        not child.suspended or (child.workload is not None and child.workload.admitted)
    )


def stop_actions(child: ChildJob) -> list[Action]:
    """Stop an unfinished stage Job: our own suspend, or for a queued one Kueue's Workload deactivation."""
    if child.finished:
        return []
    if child.queue is None:
        return [] if child.suspended else [SetSuspend(child.name, True)]
    if child.workload is None or not child.workload.active:
        return []  # no Workload yet: the next pass deactivates it once Kueue has made it
    return [SetWorkloadActive(child.workload.name, False)]


def resume_actions(child: ChildJob) -> list[Action]:
    """Undo `stop_actions` for a job no longer suspended; never touch what Kueue stopped by itself."""
    if child.finished:
        return []
    if child.queue is None:
        return [SetSuspend(child.name, False)] if child.suspended else []
    workload = child.workload
    if workload is not None and workload.deactivated_by_operator:
        return [SetWorkloadActive(workload.name, True)]
    return []
