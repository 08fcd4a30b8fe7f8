"""Stage Jobs under Kueue: the label and suspend they are created with, the Queued condition with Kueue's
own reason, and that no decision ever flips a queued Job's suspend (Workload spec.active instead)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubedistill.api.models import DistillationJob, DistillationJobStatus, Estimate, Phase, Stage, StageState
from kubedistill.builders import build_stage_manifests
from kubedistill.domain import conditions as cond
from kubedistill.domain.actions import SetSuspend, SetWorkloadActive
from kubedistill.domain.observation import ChildJob, Observed, PodSummary, WorkloadSummary
from kubedistill.domain.phases import decide
from kubedistill.domain.queueing import DEACTIVATED_ANNOTATION, QUEUE_LABEL, summarise_workload
from kubedistill.settings import Settings, from_mapping

NOW = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(minutes=5)
SETTINGS = Settings(artifact_root="file:///tmp/kd")
INSUFFICIENT = "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor gpu"


def make_job(**spec: Any) -> DistillationJob:
    status = DistillationJobStatus(estimate=Estimate(prompts=1, teacher_calls=4, teacher_cost_usd=0.1))
    return DistillationJob.model_validate(
        {
            "metadata": {"name": "bot", "namespace": "team", "uid": "u1", "generation": 1},
            "spec": {
                "teacher": {"model": "openai/gpt-4o"},
                "student": {"model": "qwen3-0.6b"},
                "dataset": {"prompts": ["a"]},
                # Only the train stage left to run.
                "generation": {"nSamples": 1},
                "curation": {"topK": 1},
                **spec,
            },
            "status": status.to_k8s(),
        }
    )


def done(stage: Stage) -> ChildJob:
    return ChildJob(name=f"bot-{stage.value}-1", stage=stage, attempt=1, created_at=EARLIER, succeeded=True)


def train(suspended: bool, workload: WorkloadSummary | None, running: bool = False) -> ChildJob:
    return ChildJob(
        name="bot-train-1",
        stage=Stage.TRAIN,
        attempt=1,
        created_at=EARLIER,
        suspended=suspended,
        queue="gpu",
        workload=workload,
        pod=PodSummary(phase="Running") if running else None,
    )


def observed(child: ChildJob) -> Observed:
    return Observed(children=(*(done(s) for s in (Stage.GENERATE, Stage.CURATE)), child))


PENDING = WorkloadSummary(name="job-bot-train-1-abcde", reason="Pending", message=INSUFFICIENT)


def test_a_queued_stage_job_carries_the_label_and_starts_suspended() -> None:
    job = build_stage_manifests(make_job(queueName="gpu"), Stage.TRAIN, 1, SETTINGS)[-1]
    assert job["metadata"]["labels"][QUEUE_LABEL] == "gpu"
    assert job["spec"]["suspend"] is True
    requests = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]  # Kueue counts requests against the ClusterQueue


def test_an_empty_resources_override_keeps_the_default_requests() -> None:
    job = build_stage_manifests(make_job(resources={"train": {"resources": {}}}), Stage.TRAIN, 1, SETTINGS)[
        -1
    ]
    requests = job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests == SETTINGS.stage_resources[Stage.TRAIN].requests


def test_the_operators_default_queue_applies_unless_the_job_names_its_own() -> None:
    settings = from_mapping({"KUBEDISTILL_QUEUE_NAME": "team-a"}, SETTINGS)
    default = build_stage_manifests(make_job(), Stage.TRAIN, 1, settings)[-1]
    own = build_stage_manifests(make_job(queueName="gpu"), Stage.TRAIN, 1, settings)[-1]
    plain = build_stage_manifests(make_job(), Stage.TRAIN, 1, SETTINGS)[-1]
    assert default["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert own["metadata"]["labels"][QUEUE_LABEL] == "gpu"
    assert QUEUE_LABEL not in plain["metadata"]["labels"] and plain["spec"]["suspend"] is False


def test_a_default_queue_that_is_not_a_label_value_is_refused() -> None:
    with pytest.raises(ValueError, match="KUBEDISTILL_QUEUE_NAME"):
        from_mapping({"KUBEDISTILL_QUEUE_NAME": "gpu queue"})


def test_held_by_kueue_the_job_is_queued_with_kueues_reason_and_keeps_its_stage_phase() -> None:
    decision = decide(make_job(queueName="gpu"), observed(train(True, PENDING)), NOW, SETTINGS)
    queued = cond.find(decision.status.conditions, cond.QUEUED)
    assert queued is not None and (queued.status, queued.reason) == ("True", "Pending")
    assert "LocalQueue gpu" in queued.message and INSUFFICIENT in queued.message
    assert decision.status.phase == Phase.TRAINING
    entry = next(s for s in decision.status.stages if s.name == Stage.TRAIN)
    assert entry.state == StageState.PENDING
    assert decision.actions == []  # nothing touches the held Job
    assert decision.requeue_after is not None


def test_before_kueue_made_the_workload_the_job_is_queued_too() -> None:
    decision = decide(make_job(queueName="gpu"), observed(train(True, None)), NOW, SETTINGS)
    queued = cond.find(decision.status.conditions, cond.QUEUED)
    assert queued is not None and (queued.status, queued.reason) == ("True", "WorkloadPending")
    assert decision.actions == []


def test_once_kueue_admits_the_queued_condition_turns_false() -> None:
    admitted = WorkloadSummary(name=PENDING.name, admitted=True)
    decision = decide(
        make_job(queueName="gpu"), observed(train(False, admitted, running=True)), NOW, SETTINGS
    )
    queued = cond.find(decision.status.conditions, cond.QUEUED)
    assert queued is not None and (queued.status, queued.reason) == ("False", "Admitted")
    assert decision.status.phase == Phase.TRAINING and decision.actions == []


def test_suspend_deactivates_the_workload_and_never_touches_the_job() -> None:
    running = train(False, WorkloadSummary(name=PENDING.name, admitted=True), running=True)
    decision = decide(make_job(queueName="gpu", suspend=True), observed(running), NOW, SETTINGS)
    assert decision.actions == [SetWorkloadActive(PENDING.name, False)]
    assert decision.status.phase == Phase.SUSPENDED


def test_resume_reactivates_only_what_the_operator_deactivated() -> None:
    ours = WorkloadSummary(name=PENDING.name, active=False, deactivated_by_operator=True)
    kueues = WorkloadSummary(name=PENDING.name, active=False, reason="Deactivated")
    resumed = decide(make_job(queueName="gpu"), observed(train(True, ours)), NOW, SETTINGS)
    assert resumed.actions == [SetWorkloadActive(PENDING.name, True)]
    left = decide(make_job(queueName="gpu"), observed(train(True, kueues)), NOW, SETTINGS)
    assert left.actions == []


def test_a_deadline_passed_while_queued_fails_the_job_and_dequeues_it() -> None:
    job = make_job(queueName="gpu", activeDeadlineSeconds=60)
    job.status.start_time = "2026-03-01T09:50:00Z"  # type: ignore[union-attr]
    decision = decide(job, observed(train(True, PENDING)), NOW, SETTINGS)
    assert decision.status.phase == Phase.FAILED
    assert decision.actions == [SetWorkloadActive(PENDING.name, False)]
    assert not any(isinstance(a, SetSuspend) for a in decision.actions)


def test_summarise_workload_takes_kueues_reason_and_our_mark() -> None:
    workload = {
        "metadata": {"name": "job-x", "annotations": {DEACTIVATED_ANNOTATION: "true"}},
        "spec": {"active": False},
        "status": {
            "conditions": [
                {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": INSUFFICIENT},
                {"type": "Admitted", "status": "False", "reason": "NoReservation", "message": "no quota"},
            ]
        },
    }
    summary = summarise_workload(workload)
    assert summary == WorkloadSummary(
        name="job-x", active=False, deactivated_by_operator=True, reason="Pending", message=INSUFFICIENT
    )
    admitted = summarise_workload(
        {"metadata": {"name": "job-y"}, "status": {"conditions": [{"type": "Admitted", "status": "True"}]}}
    )
    assert admitted.admitted and admitted.active and admitted.reason is None
