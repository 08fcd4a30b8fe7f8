"""Scale-out on the test control plane with the real stages: the operator runs generation as an
Indexed Job of 3 shards and training as an Indexed Job of 2 pods (nodes 2, CPU) behind a headless
Service. The local kubelet runs the pods as processes; each pod's /etc/hosts (harness) resolves
`<job>-0.<service>`, so torchrun's agents rendezvous through that name and the workers train over gloo.

Rank 1's pod is killed (SIGKILL to its process group, as the kubelet kills a container) after the first
checkpoint: the attempt fails, the operator's retry starts both pods again, they resume from the
checkpoint and finish. The whole loss curve then matches a single process run on the same curated
data with the same global batch and seed (LoRA dropout 0: per-step loss within 1e-4 relative).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from sdk_cli_support import wait_until
from test_real_stages import (
    TRAINER_IMAGE,
    diagnose,
    s3,
    s3_env,
    start_operator,
    trainer_image_env,
    wait_for_success,
)

from kubedistill import store
from kubedistill.api.models import GROUP, VERSION, DistillationJobSpec, Stage
from kubedistill.api.stage import JOB_ENV, S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV, JobRef, StageInvocation
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.image_env import image_environment
from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.s3 import RcloneS3

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
__all__ = ["s3", "s3_env"]  # fixtures shared with test_real_stages

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 900.0
STEPS = 30
TRAINING = {
    "steps": STEPS,
    "batchSize": 2,
    "gradientAccumulation": 2,
    "checkpointEvery": 3,
    "maxSeqLength": 64,
    "learningRate": 1e-3,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "distributed": {"nodes": 2},
}
PROMPTS = [f"What is {i} plus {i}?" for i in range(24)]


def _pod_processes(kubelet: LocalKubelet, marker: str) -> list[int]:
    """Container processes of the kubelet whose environment holds `marker` (a KEY=value line)."""
    found = []
    for pid in kubelet.container_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(pid)
    return found


def _single_process_losses(spec: dict[str, Any], curated_base: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The same training as one process (no PET_* env) on a copy of the job's curated data."""
    base = (tmp_path / "single").as_uri()
    store.put_file(
        _download(f"{curated_base}/curate/curated/train.jsonl", tmp_path),
        f"{base}/curate/curated/train.jsonl",
    )
    single_spec = json.loads(json.dumps(spec))
    single_spec["training"].pop("distributed")
    inv = StageInvocation(
        job=JobRef(name="single", namespace="tests", uid="single"),
        spec=DistillationJobSpec.model_validate(single_spec),
        stage=Stage.TRAIN,
        artifact_base=base,
    )
    env = {**os.environ, JOB_ENV: inv.model_dump_json(by_alias=True), "OMP_NUM_THREADS": "1"}
    env["KUBEDISTILL_TERMINATION_LOG"] = str(tmp_path / "single-termination")
    done = subprocess.run(
        [sys.executable, "-m", "kubedistill_trainer", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return list(store.read_jsonl(f"{base}/train/losses.jsonl"))


def _download(uri: str, tmp_path: Path) -> Path:
    local = tmp_path / "curated-train.jsonl"
    store.get_file(uri, local)
    return local


def test_two_train_pods_rendezvous_by_name_survive_a_killed_rank_and_match_one_process(
    control_plane: Path,
    kubelet: LocalKubelet,
    namespace: str,
    k8s_api: client.ApiClient,
    s3: RcloneS3,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    if kubelet.namespace_problem:
        pytest.skip(f"pod names cannot be resolved here: {kubelet.namespace_problem}")
    core, custom, batch = (
        client.CoreV1Api(k8s_api),
        client.CustomObjectsApi(k8s_api),
        client.BatchV1Api(k8s_api),
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {S3_ACCESS_KEY_ENV: s3.access_key, S3_SECRET_KEY_ENV: s3.secret_key},
        },
    )
    run = uuid.uuid4().hex[:8]
    student = f"s3://artifacts/models/{run}/tiny-llama"
    store.put_tree(tiny_llama(), student)
    kubelet.images[TRAINER_IMAGE] = [sys.executable, "-m", "kubedistill_trainer"]
    name = "ddp"
    spec: dict[str, Any] = {
        "teacher": {"model": "fake-teacher", "maxConcurrency": 3},
        "student": {"model": student},
        "dataset": {"prompts": PROMPTS, "testFraction": 0.0},
        "generation": {"nSamples": 2, "maxTokens": 8, "shards": 3},
        "curation": {"judge": {"majority": {}}, "topK": 1},
        "training": TRAINING,
        "export": {"gguf": False},
        "evaluation": {"enabled": False},
    }
    answers = {p: f"The answer is {2 * int(p.split()[2])}." for p in PROMPTS}
    with (
        FakeTeacher(answers, models=("fake-teacher",)) as teacher,
        image_environment(kubelet, trainer_image_env()),
    ):
        spec["teacher"]["baseURL"] = teacher.base_url
        operator = start_operator(control_plane, namespace, tmp_path, s3_env)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "DistillationJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        try:
            created = custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "distillationjobs", body
            )
            base = f"s3://artifacts/kubedistill/{namespace}/{name}/{created['metadata']['uid']}"
            latest = f"{base}/train/checkpoints/latest.json"

            def first_checkpoint() -> bool:
                assert operator.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
                return store.exists(latest)

            try:
                wait_until(first_checkpoint, "the first training checkpoint", WAIT_S)
            except AssertionError:
                raise AssertionError(diagnose(custom, kubelet, namespace, name, tmp_path)) from None
            # Rank 1 dies as a container does: its process group, SIGKILL.
            (rank1,) = _pod_processes(kubelet, "PET_NODE_RANK=1")
            os.killpg(rank1, signal.SIGKILL)
            killed_at = store.read_json(latest)["step"]

            done = wait_for_success(custom, kubelet, operator, namespace, name, tmp_path, WAIT_S)
            train_jobs = {
                j.metadata.name: j
                for j in batch.list_namespaced_job(
                    namespace, label_selector="kubedistill.io/stage=train"
                ).items
            }
            services = core.list_namespaced_service(
                namespace, label_selector="kubedistill.io/stage=train"
            ).items
        finally:
            operator.terminate()
            operator.wait(timeout=30)

    status = done["status"]
    shown = json.dumps(status, indent=1)
    stages = {s["name"]: s for s in status["stages"]}
    # Generation: three shards, each prompt asked once, the cost and calls summed over them.
    assert stages["generate"]["attempts"] == 1 and "3 shards" in stages["generate"]["message"], shown
    # (this teacher takes no `n`: one call per sample)
    assert Counter(c.prompt for c in teacher.ok_calls()) == dict.fromkeys(PROMPTS, 2)
    assert status["metrics"]["teacherCalls"] == len(teacher.ok_calls()) == 2 * len(PROMPTS), shown
    # Training: the killed attempt failed as a whole, the second one resumed and finished.
    assert stages["train"]["attempts"] == 2, shown
    assert set(train_jobs) == {f"{name}-train-1", f"{name}-train-2"}
    failed = train_jobs[f"{name}-train-1"].status
    assert any(c.type == "Failed" and c.status == "True" for c in failed.conditions or []), failed
    assert {s.metadata.name for s in services} == set(train_jobs) and all(
        s.spec.cluster_ip == "None" for s in services
    )
    result = store.read_json(f"{base}/train/result.json")
    assert result["details"]["worldSize"] == 2 and result["details"]["resumedFromStep"] >= killed_at, result
    # Both ranks of the retry met at pod 0 through the headless Service's name.
    logs = "\n".join(
        p.read_text(errors="replace") for p in (kubelet.root / "logs" / namespace).rglob("*.log")
    )
    for rank in (0, 1):
        assert f"rank {rank} of 2 (gloo), rendezvous at {name}-train-2-0.{name}-train-2:29500" in logs, logs[
            -3000:
        ]

    losses = list(store.read_jsonl(f"{base}/train/losses.jsonl"))
    single = _single_process_losses(spec, base, tmp_path)
    assert [h["step"] for h in losses] == [h["step"] for h in single] == list(range(1, STEPS + 1))
    for got, want in zip(losses, single, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-6), (got, want)
