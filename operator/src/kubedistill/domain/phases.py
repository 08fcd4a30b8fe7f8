"""The phase machine: (job, what was observed, now) → what to do next and the status to report.

Pure: no I/O, no clock. The handlers observe (child Jobs and their pods, Secrets, the progress
object, the alias) and apply what this decides. The estimate is a stage like the others, the first:
its result becomes status.estimate, and no later stage starts unless it fits the budget. The phase
is derived from observation each time; only facts are kept from the previous status: an estimate
already made, stages already succeeded (with the metrics and artifacts they reported) and the
terminal Complete/Failed conditions, because children may be gone by then
(ttlSecondsAfterFinished, manual deletion) and a finished stage must never run again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

from kubedistill.api.models import (
    STAGE_PHASE,
    STAGES,
    DistillationJob,
    DistillationJobStatus,
    Phase,
    Stage,
    StageState,
    StageStatus,
)
from kubedistill.domain import conditions as cond
from kubedistill.domain import queueing
from kubedistill.domain.actions import CreateJob, Decision, DeleteJobs, Promote
from kubedistill.domain.conditions import Reason, parse_time, rfc3339
from kubedistill.domain.events import transition_events
from kubedistill.domain.gates import (
    BLOCKED_REQUEUE_S,
    Pass,
    budget_gate,
    seconds_to_deadline,
    secrets_gate,
    suspension,
)
from kubedistill.domain.naming import child_job_name
from kubedistill.domain.observation import (
    BENIGN_WAITING,
    MAX_MESSAGE,
    ChildJob,
    Observed,
)
from kubedistill.domain.plan import retry_delay, skipped_stages
from kubedistill.domain.progress import overall_progress
from kubedistill.domain.results import failure_message, merge_artifacts, merge_metrics
from kubedistill.domain.scaling import settings_problem, stage_completions
from kubedistill.settings import Settings

# ---------------------------------------------------------------------------------------- helpers


def _by_stage(children: Sequence[ChildJob]) -> dict[Stage, list[ChildJob]]:
    grouped: dict[Stage, list[ChildJob]] = {stage: [] for stage in STAGES}
    for child in children:
        grouped[child.stage].append(child)
    for kids in grouped.values():
        kids.sort(key=lambda c: c.attempt)
    return grouped


def _stage_statuses(status: DistillationJobStatus) -> dict[Stage, StageStatus]:
    known = {s.name: s for s in status.stages}
    return {stage: known.get(stage, StageStatus(name=stage)).model_copy() for stage in STAGES}


def _earliest(times: Sequence[datetime | None]) -> datetime | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


# ----------------------------------------------------------------------------------------- decide


def decide(job: DistillationJob, observed: Observed, now: datetime, settings: Settings) -> Decision:
    """The next actions and the status to report; `settings` gives retry backoff and poll interval."""
    previous = job.status or DistillationJobStatus()
    status = previous.model_copy(deep=True)
    status.observed_generation = job.metadata.generation
    ctx = Pass(
        job=job,
        observed=observed,
        now=now,
        settings=settings,
        decision=Decision(status=status),
        generation=job.metadata.generation,
    )
    if cond.is_true(status.conditions, cond.COMPLETE) or cond.is_true(status.conditions, cond.FAILED):
        _finished(ctx)
    else:
        _reconcile(ctx)
    ctx.decision.events = transition_events(previous, status) + ctx.decision.events
    return ctx.decision


def _finished(ctx: Pass) -> None:
    """A finished job only stops leftovers and honours ttlSecondsAfterFinished."""
    status = ctx.status
    status.phase = Phase.SUCCEEDED if cond.is_true(status.conditions, cond.COMPLETE) else Phase.FAILED
    children = ctx.observed.children
    for child in children:
        ctx.decision.actions += queueing.stop_actions(child)
    ttl = ctx.job.spec.ttl_seconds_after_finished
    done_at = parse_time(status.completion_time)
    if ttl is None or done_at is None or not children:
        return
    remaining = (done_at + timedelta(seconds=ttl) - ctx.now).total_seconds()
    if remaining <= 0:
        ctx.decision.actions.append(DeleteJobs(tuple(c.name for c in children)))
    else:
        ctx.decision.requeue(remaining)


def _reconcile(ctx: Pass) -> None:
    job, status, observed = ctx.job, ctx.status, ctx.observed
    spec = job.spec
    grouped = _by_stage(observed.children)
    stages = _stage_statuses(status)
    status.start_time = status.start_time or _start_time(observed.children)

    problem = settings_problem(spec, ctx.settings)
    if problem is not None:
        _fail(ctx, stages, grouped, "InvalidSpec", problem)
        return
    may_start = secrets_gate(ctx)
    deadline_left = seconds_to_deadline(ctx)
    if deadline_left is not None and deadline_left <= 0:
        _fail(
            ctx,
            stages,
            grouped,
            Reason.DEADLINE_EXCEEDED,
            f"activeDeadlineSeconds ({spec.active_deadline_seconds}) exceeded",
        )
        return
    if deadline_left is not None:
        ctx.decision.requeue(deadline_left)

    suspended = suspension(ctx, grouped)
    may_start = may_start and not suspended

    skipped = skipped_stages(spec)
    current: Stage | None = None
    budget_checked = False
    for stage in STAGES:
        entry = stages[stage]
        if stage == Stage.ESTIMATE and status.estimate is not None:
            # Known from an earlier pass (its Job may be gone since): never estimated twice.
            entry.state = StageState.SUCCEEDED
            entry.message = entry.message or "estimated"
            continue
        if stage != Stage.ESTIMATE and not budget_checked:
            # Reached only with the estimate in hand: every later stage is gated on it.
            may_start = budget_gate(ctx) and may_start
            budget_checked = True
        if stage in skipped:
            entry.state, entry.message = StageState.SKIPPED, skipped[stage]
            continue
        if entry.state == StageState.SUCCEEDED:
            continue
        kids = grouped[stage]
        winner = next((c for c in kids if c.succeeded), None)
        if winner is not None:
            _stage_succeeded(ctx, entry, winner, kids)
            if stage == Stage.ESTIMATE and not _take_estimate(ctx, winner):
                _fail(ctx, stages, grouped, Reason.ESTIMATE_FAILED, "the estimate stage reported no estimate")
                return
            continue
        current = stage
        outcome = _advance_stage(ctx, entry, kids, may_start, deadline_left)
        if outcome is not None:
            reason = Reason.ESTIMATE_FAILED if stage == Stage.ESTIMATE else Reason.STAGE_FAILED
            _fail(ctx, stages, grouped, reason, outcome)
            return
        break
    status.stages = [stages[s] for s in STAGES]

    if suspended:
        status.phase = Phase.SUSPENDED
    elif current is not None:
        # The estimate's own attempts do not make a blocked job (budget, Secrets) look started.
        started = any(stages[s].attempts for s in STAGES if s is current or s is not Stage.ESTIMATE)
        status.phase = STAGE_PHASE[current] if started or may_start else Phase.PENDING
    else:
        _complete(ctx)
    _progress(ctx, stages, current)


def _start_time(children: Sequence[ChildJob]) -> str | None:
    first = _earliest([c.created_at for c in children])
    return rfc3339(first) if first is not None else None


def _take_estimate(ctx: Pass, winner: ChildJob) -> bool:
    """status.estimate from the estimate stage's result; False when it reported none."""
    if winner.result is None or winner.result.estimate is None:
        return False
    ctx.status.estimate = winner.result.estimate
    return True


def _stage_succeeded(ctx: Pass, entry: StageStatus, winner: ChildJob, kids: Sequence[ChildJob]) -> None:
    status = ctx.status
    entry.state = StageState.SUCCEEDED
    entry.job_name = winner.name
    entry.attempts = max(entry.attempts, winner.attempt, *(c.attempt for c in kids))
    entry.start_time = entry.start_time or _rfc(_earliest([c.created_at for c in kids]))
    entry.completion_time = _rfc(winner.finished_at) or rfc3339(ctx.now)
    if winner.result is not None:
        status.metrics = merge_metrics(status.metrics, winner.result.metrics)
        status.artifacts = merge_artifacts(status.artifacts, winner.result.artifacts)
        entry.message = (winner.result.message or "completed")[:MAX_MESSAGE]
    else:
        entry.message = "completed; no result was reported"


def _rfc(moment: datetime | None) -> str | None:
    return rfc3339(moment) if moment is not None else None


def _advance_stage(
    ctx: Pass, entry: StageStatus, kids: Sequence[ChildJob], may_start: bool, deadline_left: float | None
) -> str | None:
    """Drive one unfinished stage; returns the failure message when its retries are spent."""
    latest = kids[-1] if kids else None
    entry.attempts = max(entry.attempts, latest.attempt if latest else 0)
    entry.start_time = entry.start_time or _rfc(_earliest([c.created_at for c in kids]))
    entry.completion_time = None
    if latest is not None:
        entry.job_name = latest.name

    if latest is not None and latest.failed:
        failures = entry.attempts
        message = failure_message(latest)
        delay = retry_delay(failures, ctx.job.spec, ctx.settings)
        if delay is None:
            entry.state = StageState.FAILED
            entry.completion_time = _rfc(latest.finished_at) or rfc3339(ctx.now)
            entry.message = f"attempt {latest.attempt} failed: {message}"
            return f"stage {entry.name.value} failed after {failures} attempt(s): {message}"
        retry_at = (latest.finished_at or ctx.now) + timedelta(seconds=delay)
        wait = (retry_at - ctx.now).total_seconds()
        entry.state = StageState.BACKOFF
        entry.message = f"attempt {latest.attempt} failed: {message}"
        if wait > 0 or not may_start:
            ctx.decision.requeue(wait if wait > 0 else BLOCKED_REQUEUE_S)
            if may_start:
                entry.message += f"; retrying in {math.ceil(wait)}s"
                ctx.set(cond.READY, "True", Reason.BACKOFF, entry.message[:MAX_MESSAGE])
            return None
        _start(ctx, entry, entry.attempts + 1, deadline_left)
        return None

    if latest is not None:
        _observe_running(ctx, entry, latest)
        return None

    entry.state = StageState.PENDING
    entry.message = None
    if may_start:
        _start(ctx, entry, entry.attempts + 1, deadline_left)
    return None


def _start(ctx: Pass, entry: StageStatus, attempt: int, deadline_left: float | None) -> None:
    deadline = (
        max(1, math.ceil(deadline_left))
        if deadline_left is not None
        else ctx.job.spec.active_deadline_seconds
    )
    ctx.decision.actions.append(CreateJob(entry.name, attempt, deadline))
    entry.attempts = attempt
    entry.job_name = child_job_name(
        ctx.job.metadata.name, entry.name, attempt, stage_completions(ctx.job.spec, entry.name)
    )
    entry.state = StageState.PENDING
    entry.start_time = entry.start_time or rfc3339(ctx.now)
    entry.message = f"attempt {attempt} created"
    ctx.status.start_time = ctx.status.start_time or rfc3339(ctx.now)
    ctx.set(cond.READY, "True", Reason.RUNNING, f"{entry.name.value} attempt {attempt} starting")
    ctx.decision.requeue(ctx.settings.progress_interval_s)


def _observe_running(ctx: Pass, entry: StageStatus, child: ChildJob) -> None:
    pod = child.pod
    if child.queue is not None and _queued(ctx, entry, child):
        return
    if child.suspended:
        entry.state, entry.message = StageState.PENDING, f"attempt {child.attempt} suspended"
        return
    if pod is not None and pod.unschedulable:
        entry.state = StageState.PENDING
        entry.message = f"Unschedulable: {pod.unschedulable}"[:MAX_MESSAGE]
        ctx.set(cond.READY, "False", Reason.UNSCHEDULABLE, f"{entry.name.value}: {pod.unschedulable}")
        ctx.decision.requeue(BLOCKED_REQUEUE_S)
        return
    if pod is not None and pod.waiting_reason and pod.waiting_reason not in BENIGN_WAITING:
        entry.state = StageState.PENDING
        entry.message = f"{pod.waiting_reason}: {pod.waiting_message or ''}".strip()[:MAX_MESSAGE]
        ctx.set(cond.READY, "False", pod.waiting_reason, f"{entry.name.value}: {entry.message}")
        ctx.decision.requeue(BLOCKED_REQUEUE_S)
        return
    running = pod is not None and pod.phase == "Running"
    entry.state = StageState.RUNNING if running else StageState.PENDING
    entry.message = f"attempt {child.attempt} {'running' if running else 'waiting for its pod'}"
    ctx.set(cond.READY, "True", Reason.RUNNING, f"{entry.name.value} attempt {child.attempt} running")


def _queued(ctx: Pass, entry: StageStatus, child: ChildJob) -> bool:
    """Report whether Kueue holds this stage's Job; the phase stays at the stage meanwhile."""
    held = queueing.held(child)
    if held is None:
        if queueing.admitted(child):
            ctx.set(
                cond.QUEUED, "False", queueing.ADMITTED, f"admitted by Kueue from LocalQueue {child.queue}"
            )
        return False
    reason, message = held
    entry.state, entry.message = StageState.PENDING, message[:MAX_MESSAGE]
    ctx.set(cond.QUEUED, "True", reason, message[:MAX_MESSAGE])
    ctx.set(cond.READY, "False", Reason.QUEUED, f"{entry.name.value}: {message}"[:MAX_MESSAGE])
    # Kueue's reason changes without the Job changing (no watch event): look again.
    ctx.decision.requeue(BLOCKED_REQUEUE_S)
    return True


def _fail(
    ctx: Pass,
    stages: dict[Stage, StageStatus],
    grouped: dict[Stage, list[ChildJob]],
    reason: str,
    message: str,
) -> None:
    status = ctx.status
    status.stages = [stages[s] for s in STAGES]
    status.phase = Phase.FAILED
    status.completion_time = rfc3339(ctx.now)
    ctx.set(cond.FAILED, "True", reason, message)
    ctx.set(cond.READY, "False", reason, message)
    for kids in grouped.values():
        for child in kids:
            ctx.decision.actions += queueing.stop_actions(child)
    ttl = ctx.job.spec.ttl_seconds_after_finished
    if ttl is not None:
        ctx.decision.requeue(float(ttl))


def _complete(ctx: Pass) -> None:
    status, spec = ctx.status, ctx.job.spec
    alias = spec.promotion.alias
    if alias is not None and not cond.is_true(status.conditions, cond.PROMOTION_SKIPPED):
        score = status.metrics.eval_score if status.metrics else None
        minimum = spec.promotion.min_eval_score
        if score is None and minimum > 0:
            ctx.set(
                cond.PROMOTION_SKIPPED,
                "True",
                Reason.NO_EVAL_SCORE,
                f"alias {alias} not re-pointed: no evalScore was reported, minEvalScore is {minimum:g}",
            )
        elif score is not None and score < minimum:
            ctx.set(
                cond.PROMOTION_SKIPPED,
                "True",
                Reason.SCORE_BELOW_MINIMUM,
                f"alias {alias} not re-pointed: evalScore {score:.4g} < minEvalScore {minimum:.4g}",
            )
        elif ctx.observed.alias_target_job == ctx.job.metadata.name:
            ctx.set(cond.PROMOTED, "True", Reason.PROMOTED, f"ModelAlias {alias} points at this job")
        else:
            quantization = spec.export.quantizations[0] if spec.export.quantizations else "q4_k_m"
            ctx.decision.actions.append(Promote(alias, quantization))
            ctx.set(cond.PROMOTED, "False", Reason.PROMOTING, f"re-pointing ModelAlias {alias}")
            status.phase = Phase.PROMOTING
            ctx.decision.requeue(1.0)
            return
    status.phase = Phase.SUCCEEDED
    status.completion_time = status.completion_time or rfc3339(ctx.now)
    ctx.set(cond.COMPLETE, "True", Reason.SUCCEEDED, "all stages succeeded")
    ctx.set(cond.READY, "True", Reason.SUCCEEDED, "all stages succeeded")
    ttl = spec.ttl_seconds_after_finished
    if ttl is not None:
        ctx.decision.requeue(float(ttl))


def _progress(ctx: Pass, stages: dict[Stage, StageStatus], current: Stage | None) -> None:
    ctx.status.progress = overall_progress(
        stages, current, ctx.status.phase, ctx.status.progress, ctx.observed.progress
    )
    if current is not None and stages[current].state == StageState.RUNNING:
        ctx.decision.requeue(ctx.settings.progress_interval_s)
