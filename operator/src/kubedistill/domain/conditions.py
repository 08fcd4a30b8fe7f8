"""Conditions with metav1 semantics: one per type, lastTransitionTime moves only when status flips."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from kubedistill.api.models import Condition

Status = Literal["True", "False", "Unknown"]

# Condition types.
READY = "Ready"
COMPLETE = "Complete"
FAILED = "Failed"
SUSPENDED = "Suspended"
# True while Kueue holds the current stage's Job (reason and message are Kueue's own).
QUEUED = "Queued"
BUDGET_EXCEEDED = "BudgetExceeded"
SECRET_MISSING = "SecretMissing"
PROMOTED = "Promoted"
PROMOTION_SKIPPED = "PromotionSkipped"
# Set on a deleted job while its finalizer still has work to do (only jobs that delete their artifacts).
DELETING = "Deleting"


class Reason:
    """CamelCase reasons, stable for alerting and `kubectl wait`."""

    RUNNING = "StageRunning"
    BACKOFF = "StageBackOff"
    PENDING = "StagePending"
    UNSCHEDULABLE = "Unschedulable"
    QUEUED = "Queued"
    SUCCEEDED = "Succeeded"
    STAGE_FAILED = "StageFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    ESTIMATE_FAILED = "EstimateFailed"
    BUDGET_EXCEEDED = "BudgetExceeded"
    WITHIN_BUDGET = "WithinBudget"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRETS_FOUND = "SecretsFound"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    PROMOTED = "Promoted"
    PROMOTING = "Promoting"
    SCORE_BELOW_MINIMUM = "ScoreBelowMinimum"
    NO_EVAL_SCORE = "NoEvalScore"
    TARGET_RESOLVED = "TargetResolved"
    JOB_NOT_FOUND = "JobNotFound"
    JOB_NOT_SUCCEEDED = "JobNotSucceeded"
    ARTIFACT_MISSING = "ArtifactMissing"
    PODS_TERMINATING = "StagePodsTerminating"
    ARTIFACT_DELETION_FAILED = "ArtifactDeletionFailed"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    found = find(conditions, type_)
    return found is not None and found.status == "True"


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: Status,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """A new list with `type_` set; lastTransitionTime is kept unless the status flips."""
    previous = find(conditions, type_)
    kept = previous.last_transition_time if previous is not None and previous.status == status else None
    updated = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:32768],
        last_transition_time=kept or rfc3339(now),
        observed_generation=generation,
    )
    replaced = [updated if c.type == type_ else c for c in conditions]
    return replaced if previous is not None else [*conditions, updated]


def clear_condition(
    conditions: Sequence[Condition],
    type_: str,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Set `type_` False if it was ever reported; a condition that never applied stays absent."""
    if find(conditions, type_) is None:
        return list(conditions)
    return set_condition(conditions, type_, "False", reason, message, now=now, generation=generation)
