"""What lets a stage Job start, or stops it, in one pass of the phase machine (:mod:`.phases`): the
Secrets it references, the budget against the estimate, the active deadline, and spec.suspend. Pure, like
the machine: each gate sets its conditions on the pass's status and adds its actions to its decision."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from kubedistill.api.models import DistillationJob, DistillationJobStatus, Stage
from kubedistill.domain import conditions as cond
from kubedistill.domain import queueing
from kubedistill.domain.actions import Decision
from kubedistill.domain.conditions import Reason, parse_time
from kubedistill.domain.observation import ChildJob, Observed
from kubedistill.settings import Settings

# Secrets and unscheduled pods change without an event the operator watches: look again this often.
BLOCKED_REQUEUE_S = 15.0


@dataclass
class Pass:
    """One pass of the phase machine: its inputs, and the decision it builds."""

    job: DistillationJob
    observed: Observed
    now: datetime
    settings: Settings
    decision: Decision
    generation: int | None

    @property
    def status(self) -> DistillationJobStatus:
        return self.decision.status

    def set(self, type_: str, status: cond.Status, reason: str, message: str) -> None:
        self.status.conditions = cond.set_condition(
            self.status.conditions, type_, status, reason, message, now=self.now, generation=self.generation
        )

    def clear(self, type_: str, reason: str, message: str) -> None:
        self.status.conditions = cond.clear_condition(
            self.status.conditions, type_, reason, message, now=self.now, generation=self.generation
        )


def secrets_gate(ctx: Pass) -> bool:
    """Whether a stage Job may start as far as the Secrets it references go (names only)."""
    missing = ctx.observed.missing_secrets
    if missing:
        message = "; ".join(missing)
        ctx.set(cond.SECRET_MISSING, "True", Reason.SECRET_NOT_FOUND, message)
        ctx.set(cond.READY, "False", Reason.SECRET_NOT_FOUND, message)
        ctx.decision.requeue(BLOCKED_REQUEUE_S)
        return False
    ctx.clear(cond.SECRET_MISSING, Reason.SECRETS_FOUND, "all referenced Secrets exist")
    return True


def budget_gate(ctx: Pass) -> bool:
    """Whether the estimated teacher cost lets the stages after the estimate start."""
    status, spec = ctx.status, ctx.job.spec
    assert status.estimate is not None
    cost = status.estimate.teacher_cost_usd
    budget = spec.budget.max_teacher_cost_usd
    fits = budget is None or cost <= budget
    status.estimate = status.estimate.model_copy(update={"fits_budget": fits})
    if budget is None:
        ctx.clear(cond.BUDGET_EXCEEDED, Reason.WITHIN_BUDGET, "no budget set")
        return True
    if fits:
        ctx.set(
            cond.BUDGET_EXCEEDED,
            "False",
            Reason.WITHIN_BUDGET,
            f"estimated {usd(cost)} ≤ budget {usd(budget)}",
        )
        return True
    message = (
        f"estimated teacher cost {usd(cost)} exceeds budget.maxTeacherCostUSD {usd(budget)}; "
        "no stage starts until the budget is raised"
    )
    ctx.set(cond.BUDGET_EXCEEDED, "True", Reason.BUDGET_EXCEEDED, message)
    ctx.set(cond.READY, "False", Reason.BUDGET_EXCEEDED, message)
    return False


def usd(amount: float) -> str:
    """Cents for real money, significant digits for tiny test budgets ($0.0003, not $0.00)."""
    return (
        f"${amount:,.2f}" if amount >= 0.01 or amount == 0 else "$" + f"{amount:.6f}".rstrip("0").rstrip(".")
    )


def seconds_to_deadline(ctx: Pass) -> float | None:
    limit = ctx.job.spec.active_deadline_seconds
    started = parse_time(ctx.status.start_time)
    if limit is None or started is None:
        return None
    return (started + timedelta(seconds=limit) - ctx.now).total_seconds()


def suspension(ctx: Pass, grouped: dict[Stage, list[ChildJob]]) -> bool:
    active = [c for kids in grouped.values() for c in kids if not c.finished]
    if ctx.job.spec.suspend:
        for child in active:
            ctx.decision.actions += queueing.stop_actions(child)
        ctx.set(
            cond.SUSPENDED, "True", Reason.SUSPENDED, "spec.suspend is true: the running stage is stopped"
        )
        ctx.set(cond.READY, "False", Reason.SUSPENDED, "suspended")
        return True
    for child in active:
        ctx.decision.actions += queueing.resume_actions(child)
    ctx.clear(cond.SUSPENDED, Reason.RESUMED, "spec.suspend is false")
    return False
