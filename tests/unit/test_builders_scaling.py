"""Stage Jobs on several pods: the Indexed train Job + headless Service + PET_* env of distributed
training, the Indexed generate Job of sharded generation, name lengths, and the problems only the
operator's settings reveal."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from test_builders import container, env_map, job_of, make_job

from kubedistill.api.models import Metrics, Phase, Stage
from kubedistill.api.stage import StageProgress, StageResult
from kubedistill.builders import build_stage_manifests
from kubedistill.domain.naming import MAX_NAME, child_job_name, rendezvous_service_name
from kubedistill.domain.observation import Observed
from kubedistill.domain.parts import merge_progress, merge_results
from kubedistill.domain.phases import decide
from kubedistill.domain.scaling import settings_problem, train_world
from kubedistill.settings import Settings

CPU = Settings(storage_bucket="artifacts", train_gpus=0)
GPU = Settings(storage_bucket="artifacts", train_gpus=1)
RANK_REF = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}


def _training(**distributed: Any) -> dict[str, Any]:
    return {"training": {"gradientAccumulation": 8, "distributed": distributed}}


def test_two_cpu_nodes_get_an_indexed_job_and_a_headless_service() -> None:
    manifests = build_stage_manifests(make_job(**_training(nodes=2)), Stage.TRAIN, 1, CPU)
    assert [m["kind"] for m in manifests] == ["Service", "Job"]
    service, job = manifests
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        2,
        2,
        0,
    )
    pod = spec["template"]["spec"]
    assert job["metadata"]["name"] == "bot-train-1" and pod["subdomain"] == service["metadata"]["name"]
    assert env_map(job) | {"PET_NODE_RANK": RANK_REF} == env_map(job)
    pet = {k: v for k, v in env_map(job).items() if k.startswith("PET_")}
    assert pet == {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": RANK_REF,
        "PET_MASTER_ADDR": f"bot-train-1-0.{service['metadata']['name']}",
        "PET_MASTER_PORT": "29500",
    }
    assert "nvidia.com/gpu" not in container(job)["resources"].get("limits", {})
    svc = service["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
    # It selects exactly this attempt's pods, and is owned by the DistillationJob like the Job.
    assert svc["selector"] == spec["template"]["metadata"]["labels"]
    assert service["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert svc["ports"] == [{"name": "rendezvous", "port": 29500, "targetPort": 29500}]


def test_gpu_nodes_run_one_process_per_gpu() -> None:
    job = job_of(build_stage_manifests(make_job(**_training(nodes=2, gpusPerNode=4)), Stage.TRAIN, 1, GPU))
    assert env_map(job)["PET_NPROC_PER_NODE"] == "4"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert train_world(make_job(**_training(nodes=2, gpusPerNode=4)).spec, GPU).size == 8


def test_one_node_of_several_processes_needs_no_service() -> None:
    manifests = build_stage_manifests(make_job(**_training(nodes=1, procsPerNode=2)), Stage.TRAIN, 1, CPU)
    assert [m["kind"] for m in manifests] == ["Job"]
    job = manifests[0]
    assert job["spec"]["completionMode"] == "Indexed" and "subdomain" not in job["spec"]["template"]["spec"]
    assert env_map(job)["PET_MASTER_ADDR"] == "127.0.0.1" and env_map(job)["PET_NPROC_PER_NODE"] == "2"


def test_without_distributed_training_the_job_is_unchanged() -> None:
    (job,) = build_stage_manifests(make_job(), Stage.TRAIN, 1, GPU)
    assert "completionMode" not in job["spec"] and not any(k.startswith("PET_") for k in env_map(job))


def test_sharded_generation_retries_each_shard_alone() -> None:
    job_spec = make_job(generation={"shards": 2}, retries=3)
    (job,) = build_stage_manifests(job_spec, Stage.GENERATE, 1, CPU)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec
    # Other stages of the same job stay single pods.
    (curate,) = build_stage_manifests(job_spec, Stage.CURATE, 1, CPU)
    assert "completionMode" not in curate["spec"] and curate["spec"]["backoffLimit"] == 0


@pytest.mark.parametrize("job_name", ["a" * 63, "7" + "b" * 62, "x.y" + "c" * 60])
def test_pod_hostnames_and_the_service_name_fit_63_characters(job_name: str) -> None:
    name = child_job_name(job_name, Stage.TRAIN, 10, completions=64)
    assert len(f"{name}-63") <= MAX_NAME
    service = rendezvous_service_name(name)
    assert len(service) <= MAX_NAME and service[0].isalpha() and "." not in service
    assert child_job_name(job_name, Stage.TRAIN, 10, completions=64) != child_job_name(
        job_name, Stage.TRAIN, 11
    )


def test_settings_problems_name_the_field() -> None:
    gpus_on_cpu = make_job(**_training(nodes=2, gpusPerNode=1)).spec
    problem = settings_problem(gpus_on_cpu, CPU)
    assert (
        problem is not None and "spec.training.distributed.gpusPerNode" in problem and "CPU-only" in problem
    )
    assert settings_problem(gpus_on_cpu, GPU) is None
    # The operator's default of 2 GPUs a pod makes 4 processes: more than 2 micro-batches a step.
    few_micro_batches = make_job(training={"gradientAccumulation": 2, "distributed": {"nodes": 2}}).spec
    problem = settings_problem(few_micro_batches, Settings(storage_bucket="a", train_gpus=2))
    assert problem is not None and "spec.training.gradientAccumulation (2)" in problem
    assert settings_problem(make_job(**_training(nodes=2, procsPerNode=1)).spec, GPU) is not None
    assert settings_problem(make_job(**_training(nodes=2)).spec, CPU) is None


def test_a_settings_problem_fails_the_job_before_any_stage() -> None:
    job = make_job(**_training(nodes=2, gpusPerNode=1))
    decision = decide(job, Observed(children=()), datetime(2026, 1, 1, tzinfo=UTC), CPU)
    assert decision.status.phase == Phase.FAILED and not decision.actions
    failed = next(c for c in decision.status.conditions if c.type == "Failed")
    assert failed.reason == "InvalidSpec" and "gpusPerNode" in failed.message


def _part(ok: bool, calls: int, cost: float, answered: int, reason: str = "Succeeded") -> StageResult:
    return StageResult(
        stage=Stage.GENERATE,
        ok=ok,
        reason=reason,
        message="part",
        metrics=Metrics(teacher_calls=calls, teacher_cost_total=cost, candidates=answered * 2),
        details={"prompts": answered, "answered": answered},
    )


def test_shard_results_and_progress_add_up() -> None:
    merged = merge_results([_part(True, 3, 0.5, 3), _part(True, 4, 0.25, 4)])
    assert merged.ok and merged.metrics.teacher_calls == 7 and merged.metrics.candidates == 14
    assert merged.metrics.teacher_cost_total == pytest.approx(0.75)
    assert merged.details["answered"] == 7 and "2 shards: 7/7 prompts" in merged.message

    failed = merge_results([_part(True, 3, 0.5, 3), _part(False, 1, 0.1, 1, "TeacherUnavailable"), None])
    assert not failed.ok and failed.reason == "TeacherUnavailable"
    assert failed.message.startswith("2 of 3 shards failed; shard 1")
    assert merge_results([None]).reason == "ShardMissing"

    progress = merge_progress(
        [
            StageProgress(stage=Stage.GENERATE, done=2, total=5, cost_usd=0.1, eta_seconds=3.0),
            StageProgress(stage=Stage.GENERATE, done=4, total=5, cost_usd=0.2, eta_seconds=1.0),
        ]
    )
    assert progress is not None and (progress.done, progress.total, progress.eta_seconds) == (6, 10, 3.0)
    assert progress.cost_usd == pytest.approx(0.3)
    assert merge_progress([]) is None
