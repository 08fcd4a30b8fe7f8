"""What the operator observed of a job, reduced to what the phase machine needs: its child Jobs (one
per stage attempt) with their pods, missing Secrets, the estimate, the running stage's progress and
the alias it promotes. `k8s.observe` fills these in; `domain.phases.decide` reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from kubedistill.api.models import Stage
from kubedistill.api.stage import StageProgress, StageResult

# Pod waiting reasons that are normal on the way to Running, as opposed to ones a user must fix.
BENIGN_WAITING = frozenset({"ContainerCreating", "PodInitializing"})
# Longest message kept from a pod or a stage in the status.
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class PodSummary:
    phase: str = "Pending"
    unschedulable: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    termination_message: str | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class WorkloadSummary:
    """The Kueue Workload of a queued stage Job: whether Kueue admitted it, and its own words if not."""

    name: str
    active: bool = True
    # spec.active was set false by the operator (spec.suspend), not by Kueue itself.
    deactivated_by_operator: bool = False
    admitted: bool = False
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class ChildJob:
    """One batch/v1 Job of one stage attempt, reduced to what the decision needs."""

    name: str
    stage: Stage
    attempt: int
    created_at: datetime | None = None
    finished_at: datetime | None = None
    succeeded: bool = False
    failed: bool = False
    failure_reason: str | None = None
    suspended: bool = False
    pod: PodSummary | None = None
    result: StageResult | None = None
    # The Kueue LocalQueue the Job was created for (its queue-name label), and Kueue's Workload of it.
    queue: str | None = None
    workload: WorkloadSummary | None = None

    @property
    def finished(self) -> bool:
        return self.succeeded or self.failed


@dataclass(frozen=True)
class Observed:
    children: tuple[ChildJob, ...] = ()
    missing_secrets: tuple[str, ...] = ()
    progress: StageProgress | None = None
    # Name of the DistillationJob the promotion alias points at now (None: no alias or another target).
    alias_target_job: str | None = None


def parse_termination_message(text: str | None) -> StageResult | None:
    """The compact StageResult a stage writes to its termination log; None for anything else."""
    if not text or not text.lstrip().startswith("{"):
        return None
    try:
        return StageResult.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError):
        return None
