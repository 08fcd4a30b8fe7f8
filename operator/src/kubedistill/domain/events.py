"""Kubernetes Events for what changed between two statuses of a job: one per transition, never repeated."""

from __future__ import annotations

from kubedistill.api.models import STAGE_PHASE, DistillationJobStatus, StageState, StageStatus
from kubedistill.domain import conditions as cond
from kubedistill.domain.actions import Event


def transition_events(old: DistillationJobStatus, new: DistillationJobStatus) -> list[Event]:
    """Kubernetes Events for what changed between two statuses: one per transition, never repeated."""
    events: list[Event] = []
    old_stages = {s.name: s for s in old.stages}
    for entry in new.stages:
        before = old_stages.get(entry.name, StageStatus(name=entry.name))
        if entry.attempts > before.attempts:
            events.append(
                Event(
                    "Normal",
                    "StageStarted",
                    f"{entry.name.value} attempt {entry.attempts}: Job {entry.job_name}",
                )
            )
        if entry.state != before.state and entry.state in (StageState.BACKOFF, StageState.FAILED):
            events.append(
                Event("Warning", f"Stage{entry.state.value}", f"{entry.name.value}: {entry.message or ''}")
            )
        if entry.state != before.state and entry.state == StageState.SUCCEEDED:
            events.append(
                Event("Normal", "StageSucceeded", f"{entry.name.value}: {entry.message or 'completed'}")
            )
    for condition in new.conditions:
        was = cond.find(old.conditions, condition.type)
        flipped = was is None or was.status != condition.status or was.reason != condition.reason
        if not flipped or condition.type in (cond.READY, cond.COMPLETE) or condition.status != "True":
            continue
        warning = condition.type in (
            cond.FAILED,
            cond.BUDGET_EXCEEDED,
            cond.SECRET_MISSING,
            cond.PROMOTION_SKIPPED,
        )
        events.append(Event("Warning" if warning else "Normal", condition.reason, condition.message))
    # Stage phases (Generating…) are told by StageStarted; the others get an event of their own.
    if new.phase is not None and new.phase != old.phase and new.phase not in STAGE_PHASE.values():
        events.append(Event("Normal", f"Phase{new.phase.value}", f"phase is now {new.phase.value}"))
    return events
