"""What the phase machine decides: the status to report, the actions the handlers apply (create a stage
Job, flip its suspend, delete Jobs, re-point an alias), the events to post and when to look again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubedistill.api.models import DistillationJobStatus, Stage


@dataclass(frozen=True)
class CreateJob:
    stage: Stage
    attempt: int
    active_deadline_seconds: int | None = None


@dataclass(frozen=True)
class SetSuspend:
    job_name: str
    suspend: bool


@dataclass(frozen=True)
class SetWorkloadActive:
    """Kueue's own way to stop or resume a queued Job: its Workload's spec.active (the Job is Kueue's)."""

    workload: str
    active: bool


@dataclass(frozen=True)
class DeleteJobs:
    names: tuple[str, ...]


@dataclass(frozen=True)
class Promote:
    alias: str
    quantization: str


Action = CreateJob | SetSuspend | SetWorkloadActive | DeleteJobs | Promote


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass
class Decision:
    status: DistillationJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)
