"""Observation (Job/Pod dicts → phase-machine input) and ModelAlias resolution: pure parts."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from kubedistill.api.alias import AliasHistoryEntry, AliasTarget, CanaryTarget, ModelAlias, ModelAliasStatus
from kubedistill.api.models import DistillationJob, Phase, Stage
from kubedistill.api.stage import StageResult
from kubedistill.domain import conditions as cond
from kubedistill.domain.alias import (
    promoted_job,
    recorded_state,
    remember,
    resolve,
    serving_state,
    state_annotation,
)
from kubedistill.k8s.observe import summarise_job, summarise_pod

NOW = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def job_dict(
    name: str = "bot-train-1", conditions: list[dict[str, Any]] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "uid": "job-uid",
            "creationTimestamp": "2026-03-01T09:00:00Z",
            "labels": {"kubedistill.io/stage": "train", "kubedistill.io/attempt": "1"},
        },
        "spec": spec,
        "status": {"conditions": conditions or []},
    }


def pod_dict(
    status: dict[str, Any], owner: str = "job-uid", created: str = "2026-03-01T09:00:01Z"
) -> dict[str, Any]:
    return {"metadata": {"ownerReferences": [{"uid": owner}], "creationTimestamp": created}, "status": status}


def test_unschedulable_pod() -> None:
    pod = summarise_pod(
        {
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
                    }
                ],
            }
        }
    )
    assert pod.unschedulable == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    assert pod.phase == "Pending"


def test_failed_job_carries_the_pods_result() -> None:
    result = StageResult(stage=Stage.TRAIN, ok=False, reason="OutOfMemory", message="CUDA out of memory")
    terminated = {"exitCode": 1, "message": result.termination_message()}
    pods = [
        pod_dict(
            {"phase": "Failed", "containerStatuses": [{"name": "stage", "state": {"terminated": terminated}}]}
        ),
        pod_dict({"phase": "Running"}, owner="someone-else"),
    ]
    failed = [
        {
            "type": "Failed",
            "status": "True",
            "reason": "BackoffLimitExceeded",
            "lastTransitionTime": "2026-03-01T09:05:00Z",
        }
    ]
    child = summarise_job(job_dict(conditions=failed), pods)
    assert child is not None
    assert (child.stage, child.attempt, child.failed, child.succeeded) == (Stage.TRAIN, 1, True, False)
    assert child.finished_at == datetime(2026, 3, 1, 9, 5, tzinfo=UTC)
    assert child.result is not None and child.result.message == "CUDA out of memory"
    assert child.pod is not None and child.pod.exit_code == 1


def test_complete_and_suspended_jobs() -> None:
    complete = [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-03-01T09:06:00Z"}]
    done = summarise_job(job_dict(conditions=complete), [])
    assert done is not None and done.succeeded and not done.failed and done.pod is None
    paused = summarise_job(job_dict(suspend=True), [])
    assert paused is not None and paused.suspended and not paused.finished


def test_newest_pod_wins_and_foreign_jobs_are_ignored() -> None:
    pods = [
        pod_dict({"phase": "Failed"}, created="2026-03-01T09:00:01Z"),
        pod_dict({"phase": "Running"}, created="2026-03-01T09:02:00Z"),
    ]
    child = summarise_job(job_dict(), pods)
    assert child is not None and child.pod is not None and child.pod.phase == "Running"
    foreign = job_dict()
    foreign["metadata"]["labels"] = {}
    assert summarise_job(foreign, pods) is None


def make_alias(**target: Any) -> ModelAlias:
    return ModelAlias.model_validate(
        {"metadata": {"name": "smart", "generation": 3}, "spec": {"target": target}}
    )


def make_dj(phase: Phase, gguf: dict[str, str] | None) -> DistillationJob:
    return DistillationJob.model_validate(
        {
            "metadata": {"name": "bot"},
            "spec": {
                "teacher": {"model": "t"},
                "student": {"model": "qwen3-0.6b"},
                "dataset": {"prompts": ["a"]},
            },
            "status": {"phase": phase.value, "artifacts": {"ggufURIs": gguf} if gguf else {}},
        }
    )


def test_alias_resolves_a_finished_job() -> None:
    status = resolve(
        make_alias(distillationJob="bot", quantization="q8_0"),
        make_dj(Phase.SUCCEEDED, {"q8_0": "s3://b/q8.gguf"}),
        NOW,
    )
    assert (status.gguf_uri, status.model, status.observed_generation) == ("s3://b/q8.gguf", "qwen3-0.6b", 3)
    assert cond.is_true(status.conditions, cond.READY)


def test_alias_not_ready_reasons() -> None:
    alias = make_alias(distillationJob="bot", quantization="q4_k_m")
    cases = [
        (None, "JobNotFound"),
        (make_dj(Phase.TRAINING, None), "JobNotSucceeded"),
        (make_dj(Phase.SUCCEEDED, {"q8_0": "s3://b/q8.gguf"}), "ArtifactMissing"),
    ]
    for job, reason in cases:
        ready = cond.find(resolve(alias, job, NOW).conditions, cond.READY)
        assert ready is not None and ready.status == "False" and ready.reason == reason


def test_alias_explicit_target_and_history() -> None:
    status = resolve(make_alias(ggufURI="file:///m.gguf", baseModel="qwen3-0.6b"), None, NOW)
    assert status.gguf_uri == "file:///m.gguf" and cond.is_true(status.conditions, cond.READY)
    history = ModelAliasStatus()
    for i in range(12):
        history = remember(history, AliasHistoryEntry(target=AliasTarget(gguf_uri=f"file:///{i}.gguf")), NOW)
    assert len(history.history) == 10
    assert history.history[0].target.gguf_uri == "file:///11.gguf"
    again = remember(history, AliasHistoryEntry(target=AliasTarget(gguf_uri="file:///11.gguf")), NOW)
    assert again.history == history.history  # a retried resolution does not record the same change twice
    canary = CanaryTarget(gguf_uri="file:///c.gguf", weight=10)
    beside = remember(
        history, AliasHistoryEntry(target=AliasTarget(gguf_uri="file:///11.gguf"), canary=canary), NOW
    )
    assert beside.history[0].canary == canary  # the same target with a canary is another serving state


def test_the_recorded_serving_state_reads_both_annotation_formats() -> None:
    target, canary = AliasTarget(gguf_uri="file:///m.gguf"), CanaryTarget(gguf_uri="file:///c.gguf", weight=5)
    state = AliasHistoryEntry(target=target, canary=canary)
    assert recorded_state(state_annotation(state), state) == state
    alone = AliasHistoryEntry(target=target)
    assert recorded_state(state_annotation(alone), state) == alone
    # An operator before canaries recorded the bare target; its canary is taken as unchanged.
    assert recorded_state(json.dumps(target.to_k8s()), state) == state
    assert serving_state(make_alias(ggufURI="file:///m.gguf").spec) == alone


def test_child_events_wake_the_owner_only_on_meaningful_changes() -> None:
    import asyncio

    from kubernetes.client import Configuration

    from kubedistill.handlers.reconciler import Reconciler
    from kubedistill.k8s.client import Kube
    from kubedistill.settings import Settings

    service = Reconciler(Kube(Configuration()), Settings(), post_event=lambda *a, **k: None)
    wakeup = service._wakeups.setdefault(("ns", "bot"), asyncio.Event())
    woken = []
    for status in (
        {},
        {"active": 1},  # pod created: nothing to decide
        {"active": 1, "ready": 1},  # running
        {"active": 1, "ready": 1, "uncountedTerminatedPods": {"succeeded": ["x"]}},
        {"succeeded": 1, "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]},
        {
            "succeeded": 1,
            "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"},
                {"type": "Complete", "status": "True"},
            ],
        },
    ):
        wakeup.clear()
        service.child_changed(
            "ns", "bot", {"metadata": {"name": "bot-generate-1"}, "spec": {}, "status": status}
        )
        woken.append(wakeup.is_set())
    assert woken == [False, False, True, False, True, False]
    service.wake("ns", "bot", resource_version="42")
    service._written[("ns", "bot")] = "43"
    wakeup.clear()
    service.wake("ns", "bot", resource_version="43")  # our own status patch coming back
    assert not wakeup.is_set()


def test_promotion_checks_the_slot_it_fills() -> None:
    spec = {"target": {"distillationJob": "v1"}, "canary": {"distillationJob": "v2", "weight": 20}}
    assert promoted_job(spec, as_canary=True) == "v2"
    assert promoted_job(spec, as_canary=False) == "v1"
    assert promoted_job({"target": {"distillationJob": "v1"}}, as_canary=True) == "v1"  # no canary yet
    assert promoted_job({"target": {"ggufURI": "s3://m"}}, as_canary=False) is None
