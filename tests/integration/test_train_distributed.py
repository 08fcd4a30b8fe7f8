"""The train stage under DDP on CPU: two "pods" (each `python -m kubedistill_trainer train` with the
PET_* env the operator sets) rendezvous through torchrun over gloo on 127.0.0.1 and train the tiny
Llama; the loss curve must match a single process with the same global batch and seed.

Tolerance: LoRA dropout is 0 here, so the two runs compute the same gradients and differ only in
float summation order (DDP's all-reduce vs one accumulation): per-step loss within 1e-4 relative.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_stage_helpers import curated_rows, invocation, job_spec, run_stage, stage_env

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.api.stage import RESULT_FILE, StageResult
from kubedistill.local.tiny_model import tiny_llama

pytestmark = pytest.mark.slow

STEPS = 12
TRAINING = {
    "steps": STEPS,
    "batchSize": 2,
    "gradientAccumulation": 2,
    "checkpointEvery": 3,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def student() -> Path:
    return tiny_llama()


def _prepare(tmp_path: Path, name: str) -> str:
    base = (tmp_path / name).as_uri()
    store.write_jsonl(f"{base}/curate/curated/train.jsonl", curated_rows(9))
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pet_env(node_rank: int, nnodes: int, port: int) -> dict[str, str]:
    return {
        "PET_NNODES": str(nnodes),
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(port),
    }


def _start_group(
    base: str, tmp_path: Path, student: Path, nnodes: int, **training: int
) -> list[subprocess.Popen[str]]:
    """One process group per "pod", as the kubelet runs them (so a pod can be killed whole)."""
    inv = invocation(base, Stage.TRAIN, job_spec(student, training={**TRAINING, **training}))
    port = _free_port()
    procs = []
    for rank in range(nnodes):
        pod_dir = tmp_path / f"pod-{rank}"
        pod_dir.mkdir(exist_ok=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kubedistill_trainer", "train"],
                env=stage_env(inv, pod_dir, _pet_env(rank, nnodes, port)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return procs


def _descendants(pid: int) -> list[int]:
    children = [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    return [d for c in children for d in (c, *_descendants(c))]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent to be reaped by init."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _assert_same_curve(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for g, w in zip(got, want, strict=True):
        for part in ("loss", "sft", "pref", "kl"):
            assert g[part] == pytest.approx(w[part], rel=REL_TOL, abs=1e-6), (g["step"], part)
        assert g["lr"] == pytest.approx(w["lr"])


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, student: Path) -> None:
    single_base = _prepare(tmp_path, "single")
    single, _ = run_stage(
        invocation(single_base, Stage.TRAIN, job_spec(student, training=TRAINING)), tmp_path
    )
    assert single.ok, single.message

    base = _prepare(tmp_path, "ddp")
    procs = _start_group(base, tmp_path, student, nnodes=2)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    result = StageResult.model_validate(store.read_json(f"{base}/train/{RESULT_FILE}"))
    assert result.ok and result.details["worldSize"] == 2
    assert "2 processes" in result.message
    # torchrun started exactly one worker per pod, and only rank 0 wrote.
    assert "kubedistill_trainer" in outs[0]
    _assert_same_curve(
        store.read_jsonl(f"{base}/train/losses.jsonl"), store.read_jsonl(f"{single_base}/train/losses.jsonl")
    )
    assert store.exists(f"{base}/train/adapter/adapter_model.safetensors")


def test_a_killed_rank_fails_the_group_and_a_smaller_world_resumes(tmp_path: Path, student: Path) -> None:
    base = _prepare(tmp_path, "killed")
    procs = _start_group(base, tmp_path, student, nnodes=2)
    latest_uri = f"{base}/train/checkpoints/latest.json"
    deadline = time.monotonic() + 300
    while not store.exists(latest_uri) and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    # Rank 1's pod dies the way the kubelet kills a pod: SIGKILL to its process group. torchrun put
    # the worker in a session of its own; it must die with its agent all the same.
    worker = _descendants(procs[1].pid)
    os.killpg(procs[1].pid, signal.SIGKILL)
    procs[1].communicate()
    time.sleep(1.0)
    assert worker and not [pid for pid in worker if _alive(pid)]
    out0, _ = procs[0].communicate(timeout=300)
    assert procs[0].returncode != 0, "rank 0 must fail when its peer dies: " + out0[-3000:]
    killed_at = store.read_json(latest_uri)["step"]
    assert 3 <= killed_at < STEPS
    assert (
        not store.exists(f"{base}/train/{RESULT_FILE}")
        or not StageResult.model_validate(store.read_json(f"{base}/train/{RESULT_FILE}")).ok
    )

    # The retry runs with a different world size (one process) from the two-process checkpoint.
    inv = invocation(base, Stage.TRAIN, job_spec(student, training=TRAINING))
    resumed, log = run_stage(inv, tmp_path)
    assert resumed.ok, resumed.message
    assert resumed.details["resumedFromStep"] == killed_at and resumed.details["worldSize"] == 1
    assert f"resuming from the checkpoint at step {killed_at}" in log
    whole_base = _prepare(tmp_path, "whole")
    whole, _ = run_stage(invocation(whole_base, Stage.TRAIN, job_spec(student, training=TRAINING)), tmp_path)
    assert whole.ok, whole.message
    _assert_same_curve(
        store.read_jsonl(f"{base}/train/losses.jsonl"), store.read_jsonl(f"{whole_base}/train/losses.jsonl")
    )


def test_more_processes_than_micro_batches_is_refused(tmp_path: Path, student: Path) -> None:
    base = _prepare(tmp_path, "toomany")
    for proc in _start_group(base, tmp_path, student, nnodes=2, gradientAccumulation=1):
        proc.communicate(timeout=300)
    result = StageResult.model_validate(store.read_json(f"{base}/train/{RESULT_FILE}"))
    assert not result.ok and result.reason == "InvalidDistributedConfig"
    assert "gradientAccumulation" in result.message
