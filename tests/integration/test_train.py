"""The train stage on the tiny Llama: real PEFT LoRA, the BOND loss, checkpoints, a kill and a resume."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest
from model_stage_helpers import curated_rows, invocation, job_spec, run_stage, start_stage

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer import runtime, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student() -> Path:
    return tiny_llama()


def _prepare(tmp_path: Path, name: str) -> str:
    base = (tmp_path / name).as_uri()
    store.write_jsonl(f"{base}/curate/curated/train.jsonl", curated_rows(9))
    return base


def test_train_reports_loss_parts_and_writes_adapter(tmp_path: Path, student: Path) -> None:
    base = _prepare(tmp_path, "job")
    spec = job_spec(student, training={"steps": 6, "checkpointEvery": 3, "gradientAccumulation": 2})
    result, _ = run_stage(invocation(base, Stage.TRAIN, spec), tmp_path)
    assert result.ok, result.message
    history = store.read_jsonl(f"{base}/train/losses.jsonl")
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # LoRA starts with B = 0, so the first step sees πθ = π_ref exactly.
    assert history[0]["pref"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert history[-1]["sft"] < history[0]["sft"]
    assert history[-1]["kl"] > 0
    assert result.metrics.student_loss_final == pytest.approx(history[-1]["loss"])
    assert result.metrics.training_time_sec is not None and result.metrics.training_time_sec > 0
    assert result.details["tokensPerSecond"] > 0
    assert result.details["promptsWithRejected"] == 6
    assert set(result.details["lossParts"]) == {"loss", "sft", "pref", "kl"}
    progress = store.read_json(f"{base}/train/progress.json")
    assert progress["done"] == 6 and progress["total"] == 6
    assert "sft=" in progress["detail"] and "pref=" in progress["detail"] and "kl=" in progress["detail"]
    adapter = result.artifacts.adapter_uri
    assert adapter is not None
    assert store.exists(f"{adapter}/adapter_model.safetensors") and store.exists(
        f"{adapter}/adapter_config.json"
    )
    assert (tmp_path / "termination-train").read_text().startswith("{")


def test_killed_after_a_checkpoint_resumes_from_it(tmp_path: Path, student: Path) -> None:
    steps = 40
    spec = job_spec(student, training={"steps": steps, "checkpointEvery": 4})

    whole_base = _prepare(tmp_path, "whole")
    whole, _ = run_stage(invocation(whole_base, Stage.TRAIN, spec), tmp_path)
    assert whole.ok and whole.details["resumedFromStep"] == 0

    base = _prepare(tmp_path, "killed")
    inv = invocation(base, Stage.TRAIN, spec)
    proc = start_stage(inv, tmp_path)
    latest_uri = f"{base}/train/checkpoints/latest.json"
    deadline = time.monotonic() + 240
    while not store.exists(latest_uri) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = store.read_json(latest_uri)["step"]
    assert 4 <= killed_at < steps, "the process should die between its first checkpoint and the end"
    assert not store.exists(f"{base}/train/result.json")

    resumed, log = run_stage(inv, tmp_path)
    assert resumed.ok, resumed.message
    assert resumed.details["resumedFromStep"] == killed_at
    assert f"resuming from the checkpoint at step {killed_at}" in log
    history = store.read_jsonl(f"{base}/train/losses.jsonl")
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    # Adapter, optimiser, schedule, RNG and data order all came back: the same curve as an unbroken run.
    expected = store.read_jsonl(f"{whole_base}/train/losses.jsonl")
    for got, want in zip(history, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5)
        assert got["lr"] == pytest.approx(want["lr"])


def test_missing_curated_data_fails_clearly(tmp_path: Path, student: Path) -> None:
    base = (tmp_path / "empty").as_uri()
    result = runtime.execute(train.run, invocation(base, Stage.TRAIN, job_spec(student)))
    assert not result.ok
    assert result.reason == "MissingInput"
    assert "curate" in result.message
