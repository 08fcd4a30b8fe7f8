"""`kubedistill run examples/quickstart/job.yaml --local --preset smoke`: the real stage programs end to end
on a tiny random Llama and a scripted loopback teacher; Ctrl-C stops it, a rerun resumes and finishes,
and a run over a finished job does nothing again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubedistill.api.models import STAGES
from kubedistill.local.plan import run_dir, stable_uid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "examples" / "quickstart" / "job.yaml"
CLI = [sys.executable, "-c", "from kubedistill.cli import main; main()"]


def kubedistill(workdir: Path, *extra: str) -> subprocess.Popen[str]:
    args = [*CLI, "run", str(JOB), "--local", "--workdir", str(workdir), "--preset", "smoke", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_smoke_run_is_stopped_by_ctrl_c_resumes_and_finishes(tmp_path: Path) -> None:
    base = run_dir(tmp_path, "ticket-triage", stable_uid("ticket-triage", "smoke"))

    first = kubedistill(tmp_path)
    deadline = time.monotonic() + 240
    while not (base / "train" / "progress.json").exists() and first.poll() is None:
        assert time.monotonic() < deadline, "train never started"
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    if first.returncode == 0:
        pytest.skip("the whole smoke run finished before Ctrl-C reached it")
    assert first.returncode == 130, out
    assert "stopped: what was produced is kept" in out
    assert json.loads((base / "generate" / "result.json").read_text())["ok"] is True
    generated_at = (base / "generate" / "result.json").stat().st_mtime

    second = kubedistill(tmp_path)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "done earlier" in out
    assert (base / "generate" / "result.json").stat().st_mtime == generated_at  # not asked again
    for stage in STAGES:
        assert json.loads((base / stage.value / "result.json").read_text())["ok"] is True, stage

    figures = json.loads((base / "local" / "summary.json").read_text())
    assert figures["teacherScore"] == 1.0  # the scripted teacher answers each ticket's reference
    assert figures["studentBefore"] is not None and figures["studentAfter"] is not None
    assert (
        figures["heldOutRows"] > 0
        and figures["teacherPromptTokensPerCall"] > figures["studentPromptTokensPerCall"]
    )
    assert figures["studentAnswerTokensPerCall"] is not None and figures["lossFinal"] is not None
    assert list((base / "export").rglob("*q4_k_m.gguf"))
    for row in ("student before training", "student after training", "tokens per call, teacher"):
        assert row in out

    third = kubedistill(tmp_path)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0 and out.count("done earlier") == len(STAGES), out
