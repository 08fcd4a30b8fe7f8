"""The phase machine as a table: (spec, status, observed children, now) → actions, phase, conditions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubedistill.api.models import (
    Artifacts,
    DistillationJob,
    DistillationJobStatus,
    Estimate,
    Metrics,
    Phase,
    Stage,
    StageState,
    StageStatus,
)
from kubedistill.api.stage import StageProgress, StageResult
from kubedistill.domain import conditions as cond
from kubedistill.domain.actions import Action, CreateJob, DeleteJobs, Promote, SetSuspend
from kubedistill.domain.observation import ChildJob, Observed, PodSummary, parse_termination_message
from kubedistill.domain.phases import decide
from kubedistill.settings import Settings

NOW = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
SETTINGS = Settings(retry_backoff_base_s=10.0, progress_interval_s=10.0)
CHEAP = Estimate(prompts=10, teacher_calls=40, teacher_cost_usd=1.5)
EARLIER = NOW - timedelta(minutes=10)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def make_job(status: DistillationJobStatus | None = None, **spec: Any) -> DistillationJob:
    return DistillationJob.model_validate(
        {
            "metadata": {"name": "bot", "namespace": "team", "uid": "u1", "generation": 2},
            "spec": {
                "teacher": {"model": "openai/gpt-4o"},
                "student": {"model": "qwen3-0.6b"},
                "dataset": {"prompts": ["a"]},
                **spec,
            },
            "status": (status or DistillationJobStatus()).to_k8s(),
        }
    )


def ok(stage: Stage, attempt: int = 1, **metrics: Any) -> ChildJob:
    result = StageResult(stage=stage, ok=True, message=f"{stage.value} done", metrics=Metrics(**metrics))
    if stage == Stage.ESTIMATE:
        result.estimate = CHEAP
    if stage == Stage.EXPORT:
        result.artifacts = Artifacts(gguf_uris={"q4_k_m": "s3://b/x.gguf"})
    return ChildJob(
        name=f"bot-{stage.value}-{attempt}",
        stage=stage,
        attempt=attempt,
        created_at=EARLIER,
        finished_at=ago(60),
        succeeded=True,
        result=result,
    )


def failed(stage: Stage, attempt: int, finished: datetime, message: str = "teacher returned 401") -> ChildJob:
    result = StageResult(stage=stage, ok=False, reason="TeacherAuth", message=message)
    return ChildJob(
        name=f"bot-{stage.value}-{attempt}",
        stage=stage,
        attempt=attempt,
        created_at=EARLIER,
        finished_at=finished,
        failed=True,
        pod=PodSummary(phase="Failed", termination_message=result.termination_message(), exit_code=1),
        result=result,
    )


def running(
    stage: Stage, attempt: int = 1, pod: PodSummary | None = None, suspended: bool = False
) -> ChildJob:
    return ChildJob(
        name=f"bot-{stage.value}-{attempt}",
        stage=stage,
        attempt=attempt,
        created_at=EARLIER,
        suspended=suspended,
        pod=pod or PodSummary(phase="Running"),
    )


def all_ok(*, score: float = 0.9, upto: Stage = Stage.EVALUATE) -> tuple[ChildJob, ...]:
    stages = list(Stage)[1 : list(Stage).index(upto) + 1]
    return tuple(ok(s, eval_score=score) if s == Stage.EVALUATE else ok(s, teacher_calls=40) for s in stages)


def with_estimate(**extra: Any) -> DistillationJobStatus:
    return DistillationJobStatus(estimate=CHEAP, **extra)


def complete_status(ttl_done_at: datetime = NOW) -> DistillationJobStatus:
    status = with_estimate(completion_time=cond.rfc3339(ttl_done_at), phase=Phase.SUCCEEDED)
    status.conditions = cond.set_condition(
        [], cond.COMPLETE, "True", "Succeeded", "", now=ttl_done_at, generation=1
    )
    return status


@dataclass
class Case:
    name: str
    observed: Observed
    status: DistillationJobStatus | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    phase: Phase | None = None
    true: tuple[str, ...] = ()
    reason: dict[str, str] = field(default_factory=dict)
    message: dict[str, str] = field(default_factory=dict)
    stage_state: dict[Stage, StageState] = field(default_factory=dict)
    requeue_at_most: float | None = None


ESTIMATED = Observed(children=(ok(Stage.ESTIMATE),))

CASES = [
    Case(
        "a new job starts with the estimate stage",
        Observed(),
        actions=[CreateJob(Stage.ESTIMATE, 1)],
        phase=Phase.ESTIMATING,
        stage_state={Stage.ESTIMATE: StageState.PENDING, Stage.GENERATE: StageState.PENDING},
    ),
    Case(
        "estimating",
        Observed(children=(running(Stage.ESTIMATE),)),
        actions=[],
        phase=Phase.ESTIMATING,
        stage_state={Stage.ESTIMATE: StageState.RUNNING},
    ),
    Case(
        "a failed estimate is retried",
        Observed(children=(failed(Stage.ESTIMATE, 1, ago(30), "StoreUnreachable: refused"),)),
        actions=[CreateJob(Stage.ESTIMATE, 2)],
        phase=Phase.ESTIMATING,
    ),
    Case(
        "estimate failed",
        Observed(
            children=tuple(
                failed(Stage.ESTIMATE, a, ago(30), "dataset s3://b/x.jsonl does not exist") for a in (1, 2, 3)
            )
        ),
        phase=Phase.FAILED,
        reason={cond.READY: "EstimateFailed", cond.FAILED: "EstimateFailed"},
        message={cond.READY: "does not exist"},
    ),
    Case(
        "an estimate stage that reports no estimate fails the job",
        Observed(
            children=(
                ChildJob(
                    name="bot-estimate-1",
                    stage=Stage.ESTIMATE,
                    attempt=1,
                    succeeded=True,
                    result=StageResult(stage=Stage.ESTIMATE, ok=True),
                ),
            )
        ),
        actions=[],
        phase=Phase.FAILED,
        reason={cond.FAILED: "EstimateFailed"},
    ),
    Case(
        "first stage starts once estimated",
        ESTIMATED,
        actions=[CreateJob(Stage.GENERATE, 1)],
        phase=Phase.GENERATING,
        stage_state={Stage.ESTIMATE: StageState.SUCCEEDED, Stage.GENERATE: StageState.PENDING},
    ),
    Case(
        "a missing Secret holds the estimate too",
        Observed(missing_secrets=("Secret s3 (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) not found",)),
        actions=[],
        phase=Phase.PENDING,
        true=(cond.SECRET_MISSING,),
    ),
    Case(
        "budget exceeded starts nothing",
        ESTIMATED,
        spec={"budget": {"maxTeacherCostUSD": 1.0}},
        actions=[],
        phase=Phase.PENDING,
        true=(cond.BUDGET_EXCEEDED,),
        message={cond.BUDGET_EXCEEDED: "$1.50 exceeds budget.maxTeacherCostUSD $1.00"},
    ),
    Case(
        "budget raised starts the first stage",
        Observed(),
        status=with_estimate(
            conditions=cond.set_condition(
                [], cond.BUDGET_EXCEEDED, "True", "BudgetExceeded", "", now=EARLIER, generation=1
            )
        ),
        spec={"budget": {"maxTeacherCostUSD": 2.0}},
        actions=[CreateJob(Stage.GENERATE, 1)],
        phase=Phase.GENERATING,
        reason={cond.BUDGET_EXCEEDED: "WithinBudget"},
    ),
    Case(
        "missing secret names it and starts nothing",
        Observed(missing_secrets=("Secret openai (key api-key) not found in namespace team",)),
        status=with_estimate(),
        actions=[],
        phase=Phase.PENDING,
        true=(cond.SECRET_MISSING,),
        message={cond.SECRET_MISSING: "Secret openai (key api-key)"},
        requeue_at_most=15,
    ),
    Case(
        "running stage is left alone",
        Observed(children=(running(Stage.GENERATE),)),
        status=with_estimate(),
        actions=[],
        phase=Phase.GENERATING,
        stage_state={Stage.GENERATE: StageState.RUNNING},
        requeue_at_most=10,
    ),
    Case(
        "next stage after success",
        Observed(children=(ok(Stage.GENERATE, teacher_calls=40),)),
        status=with_estimate(),
        actions=[CreateJob(Stage.CURATE, 1)],
        phase=Phase.CURATING,
        stage_state={Stage.GENERATE: StageState.SUCCEEDED, Stage.CURATE: StageState.PENDING},
    ),
    Case(
        "failed attempt waits out its backoff",
        Observed(children=(ok(Stage.GENERATE), failed(Stage.CURATE, 1, ago(3)))),
        status=with_estimate(),
        actions=[],
        phase=Phase.CURATING,
        stage_state={Stage.CURATE: StageState.BACKOFF},
        reason={cond.READY: "StageBackOff"},
        requeue_at_most=7,
    ),
    Case(
        "failed attempt retried after backoff",
        Observed(children=(ok(Stage.GENERATE), failed(Stage.CURATE, 1, ago(11)))),
        status=with_estimate(),
        actions=[CreateJob(Stage.CURATE, 2)],
        phase=Phase.CURATING,
    ),
    Case(
        "second failure backs off twice as long",
        Observed(
            children=(ok(Stage.GENERATE), failed(Stage.CURATE, 1, ago(100)), failed(Stage.CURATE, 2, ago(15)))
        ),
        status=with_estimate(),
        actions=[],
        stage_state={Stage.CURATE: StageState.BACKOFF},
        requeue_at_most=5,
    ),
    Case(
        "retries exhausted fails with the pod's own message",
        Observed(
            children=(
                ok(Stage.GENERATE),
                failed(Stage.CURATE, 1, ago(100)),
                failed(Stage.CURATE, 2, ago(50)),
                failed(Stage.CURATE, 3, ago(1), message="judge quota exhausted"),
            )
        ),
        status=with_estimate(),
        actions=[],
        phase=Phase.FAILED,
        true=(cond.FAILED,),
        reason={cond.FAILED: "StageFailed"},
        message={cond.FAILED: "stage curate failed after 3 attempt(s): TeacherAuth: judge quota exhausted"},
        stage_state={Stage.CURATE: StageState.FAILED},
    ),
    Case(
        "zero retries fails on the first failure",
        Observed(children=(failed(Stage.GENERATE, 1, ago(1)),)),
        status=with_estimate(),
        spec={"retries": 0},
        phase=Phase.FAILED,
        true=(cond.FAILED,),
    ),
    Case(
        "suspend stops the running Job",
        Observed(children=(ok(Stage.GENERATE), running(Stage.CURATE))),
        status=with_estimate(),
        spec={"suspend": True},
        actions=[SetSuspend("bot-curate-1", True)],
        phase=Phase.SUSPENDED,
        true=(cond.SUSPENDED,),
    ),
    Case(
        "suspended job with nothing running starts nothing",
        Observed(children=(ok(Stage.GENERATE),)),
        status=with_estimate(),
        spec={"suspend": True},
        actions=[],
        phase=Phase.SUSPENDED,
    ),
    Case(
        "resume unsuspends the Job",
        Observed(children=(ok(Stage.GENERATE), running(Stage.CURATE, suspended=True))),
        status=with_estimate(
            conditions=cond.set_condition(
                [], cond.SUSPENDED, "True", "Suspended", "", now=EARLIER, generation=1
            )
        ),
        actions=[SetSuspend("bot-curate-1", False)],
        phase=Phase.CURATING,
        reason={cond.SUSPENDED: "Resumed"},
    ),
    Case(
        "unschedulable pod shows the scheduler's reason",
        Observed(
            children=(
                ok(Stage.GENERATE),
                ok(Stage.CURATE),
                running(
                    Stage.TRAIN,
                    pod=PodSummary(unschedulable="0/1 nodes are available: 1 Insufficient nvidia.com/gpu"),
                ),
            )
        ),
        status=with_estimate(),
        actions=[],
        phase=Phase.TRAINING,
        reason={cond.READY: "Unschedulable"},
        message={cond.READY: "Insufficient nvidia.com/gpu"},
        stage_state={Stage.TRAIN: StageState.PENDING},
    ),
    Case(
        "pod config error is visible",
        Observed(
            children=(
                running(
                    Stage.GENERATE,
                    pod=PodSummary(
                        waiting_reason="CreateContainerConfigError", waiting_message='secret "x" not found'
                    ),
                ),
            )
        ),
        status=with_estimate(),
        reason={cond.READY: "CreateContainerConfigError"},
    ),
    Case(
        "all stages done: promote",
        Observed(children=all_ok(score=0.9)),
        status=with_estimate(),
        spec={"promotion": {"alias": "smart", "minEvalScore": 0.5}},
        actions=[Promote("smart", "q4_k_m")],
        phase=Phase.PROMOTING,
    ),
    Case(
        "alias points here: complete",
        Observed(children=all_ok(score=0.9), alias_target_job="bot"),
        status=with_estimate(),
        spec={"promotion": {"alias": "smart", "minEvalScore": 0.5}},
        actions=[],
        phase=Phase.SUCCEEDED,
        true=(cond.COMPLETE, cond.PROMOTED),
    ),
    Case(
        "low score skips promotion with both numbers",
        Observed(children=all_ok(score=0.3)),
        status=with_estimate(),
        spec={"promotion": {"alias": "smart", "minEvalScore": 0.75}},
        actions=[],
        phase=Phase.SUCCEEDED,
        true=(cond.COMPLETE, cond.PROMOTION_SKIPPED),
        message={cond.PROMOTION_SKIPPED: "evalScore 0.3 < minEvalScore 0.75"},
    ),
    Case(
        "evaluation disabled: done after export",
        Observed(children=all_ok(upto=Stage.EXPORT)),
        status=with_estimate(),
        spec={"evaluation": {"enabled": False}},
        phase=Phase.SUCCEEDED,
        true=(cond.COMPLETE,),
        stage_state={Stage.EVALUATE: StageState.SKIPPED},
    ),
    Case(
        "deadline exceeded fails and stops the running Job",
        Observed(children=(running(Stage.GENERATE),)),
        status=with_estimate(start_time=cond.rfc3339(ago(120))),
        spec={"activeDeadlineSeconds": 60},
        actions=[SetSuspend("bot-generate-1", True)],
        phase=Phase.FAILED,
        reason={cond.FAILED: "DeadlineExceeded"},
    ),
    Case(
        "finished job honours ttlSecondsAfterFinished",
        Observed(children=all_ok()),
        status=complete_status(ttl_done_at=ago(30)),
        spec={"ttlSecondsAfterFinished": 20},
        actions=[DeleteJobs(tuple(c.name for c in all_ok()))],
        phase=Phase.SUCCEEDED,
    ),
    Case(
        "finished job waits for its ttl",
        Observed(children=all_ok()),
        status=complete_status(ttl_done_at=ago(5)),
        spec={"ttlSecondsAfterFinished": 20},
        actions=[],
        requeue_at_most=15,
    ),
    Case(
        "a finished job is never promoted again",
        Observed(children=all_ok(), alias_target_job="someone-else"),
        status=complete_status(),
        spec={"promotion": {"alias": "smart"}},
        actions=[],
        phase=Phase.SUCCEEDED,
    ),
    Case(
        "restart with an empty status finds the running Job",
        Observed(children=(ok(Stage.ESTIMATE), ok(Stage.GENERATE), running(Stage.CURATE))),
        actions=[],
        phase=Phase.CURATING,
        stage_state={Stage.GENERATE: StageState.SUCCEEDED, Stage.CURATE: StageState.RUNNING},
    ),
    Case(
        "a recorded success is not rerun when its Job is gone",
        Observed(children=()),
        status=with_estimate(
            stages=[StageStatus(name=Stage.GENERATE, state=StageState.SUCCEEDED, attempts=2)]
        ),
        actions=[CreateJob(Stage.CURATE, 1)],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_phase_machine(case: Case) -> None:
    decision = decide(make_job(case.status, **case.spec), case.observed, NOW, SETTINGS)
    actions = [
        CreateJob(a.stage, a.attempt) if isinstance(a, CreateJob) else a for a in decision.actions
    ]  # deadlines are checked separately
    assert actions == case.actions
    status = decision.status
    if case.phase is not None:
        assert status.phase == case.phase
    for type_ in case.true:
        assert cond.is_true(status.conditions, type_), (type_, status.conditions)
    for type_, reason in case.reason.items():
        found = cond.find(status.conditions, type_)
        assert found is not None and found.reason == reason, (type_, found)
    for type_, text in case.message.items():
        found = cond.find(status.conditions, type_)
        assert found is not None and text in found.message, (type_, found)
    states = {s.name: s.state for s in status.stages}
    for stage, state in case.stage_state.items():
        assert states[stage] == state, (stage, status.stages)
    if case.requeue_at_most is not None:
        assert decision.requeue_after is not None and 0 < decision.requeue_after <= case.requeue_at_most
    assert status.observed_generation == 2
    for condition in status.conditions:
        assert condition.last_transition_time is not None


def test_results_merge_into_metrics_and_artifacts() -> None:
    observed = Observed(children=all_ok(score=0.8))
    status = decide(make_job(with_estimate()), observed, NOW, SETTINGS).status
    assert (
        status.metrics is not None and status.metrics.eval_score == 0.8 and status.metrics.teacher_calls == 40
    )
    assert status.artifacts is not None and status.artifacts.gguf_uris == {"q4_k_m": "s3://b/x.gguf"}
    assert status.progress is not None and status.progress.percent == 100.0


def test_stage_start_records_times_and_attempts() -> None:
    decision = decide(make_job(), ESTIMATED, NOW, SETTINGS)
    assert decision.status.estimate == CHEAP
    gen = decision.status.stages[1]
    assert (gen.name, gen.attempts, gen.job_name) == (Stage.GENERATE, 1, "bot-generate-1")
    # The job started with its first stage Job: the estimate's.
    assert decision.status.start_time == cond.rfc3339(EARLIER)
    assert [e.reason for e in decision.events][:1] == ["StageStarted"]


def test_child_deadline_is_what_remains() -> None:
    status = with_estimate(start_time=cond.rfc3339(ago(100)))
    decision = decide(
        make_job(status, activeDeadlineSeconds=300), Observed(children=(ok(Stage.GENERATE),)), NOW, SETTINGS
    )
    assert decision.actions == [CreateJob(Stage.CURATE, 1, 200)]


def test_progress_is_weighted_over_the_pipeline() -> None:
    progress = StageProgress(stage=Stage.TRAIN, done=50, total=100, detail="step 50/100")
    observed = Observed(
        children=(ok(Stage.GENERATE), ok(Stage.CURATE), running(Stage.TRAIN)), progress=progress
    )
    status = decide(make_job(with_estimate()), observed, NOW, SETTINGS).status
    assert status.progress is not None
    assert status.progress.stage == Stage.TRAIN and status.progress.percent == 67.5
    assert status.progress.detail == "step 50/100"


def test_a_second_decision_on_its_own_output_is_quiet() -> None:
    """Idempotence: deciding again on the reported status emits no new events and no new Jobs."""
    observed = Observed(children=(ok(Stage.GENERATE), running(Stage.CURATE)))
    first = decide(make_job(with_estimate()), observed, NOW, SETTINGS)
    second = decide(make_job(first.status), observed, NOW + timedelta(seconds=5), SETTINGS)
    assert second.actions == [] and second.events == []
    assert second.status == first.status


def test_termination_message_parsing() -> None:
    result = StageResult(stage=Stage.TRAIN, ok=False, reason="OOM", message="CUDA out of memory")
    assert parse_termination_message(result.termination_message()) == result.model_copy(
        update={"details": {}}
    )
    assert parse_termination_message("Traceback (most recent call last): ...") is None
    assert parse_termination_message(None) is None
