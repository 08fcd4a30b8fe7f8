"""The stage runner: result.json + termination log + exit code, failure reasons, redaction, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubedistill import store
from kubedistill.api.models import Metrics, Stage
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill_trainer import runtime
from kubedistill_trainer.runtime import ProgressReporter, StageFailure, execute, publish, redact

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-runtime-secret-abcdef0123456789"


def invocation(base: str) -> StageInvocation:
    return StageInvocation.model_validate(
        {
            "job": {"name": "j", "namespace": "ns", "uid": "u"},
            "spec": {"teacher": {"model": "m"}, "student": {"model": "s"}, "dataset": {"prompts": ["p"]}},
            "stage": "curate",
            "artifactBase": base,
        }
    )


def test_exceptions_become_failed_results_with_their_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEDISTILL_TEACHER_API_KEY", SECRET)
    inv = invocation("file:///unused")

    def budget(_: StageInvocation) -> StageResult:
        raise StageFailure("BudgetExceeded", f"over budget, key {SECRET}")

    def crash(_: StageInvocation) -> StageResult:
        raise KeyError("boom")

    failed = execute(budget, inv)
    assert (failed.ok, failed.reason, failed.message) == (False, "BudgetExceeded", "over budget, key ***")
    crashed = execute(crash, inv)
    assert (crashed.reason, crashed.message) == ("StageError", "KeyError: 'boom'")
    ok = execute(lambda i: StageResult(stage=i.stage, ok=True, message=f"used {SECRET}"), inv)
    assert ok.ok and ok.message == "used ***"


def test_publish_writes_result_and_termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination"
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(log))
    result = StageResult(
        stage=Stage.CURATE, ok=True, metrics=Metrics(curated=3), details={"histogram": {"0.9-1.0": 3}}
    )
    stage_uri = (tmp_path / "curate").as_uri()
    publish(result, stage_uri)
    assert store.read_json(f"{stage_uri}/result.json")["details"] == {"histogram": {"0.9-1.0": 3}}
    assert json.loads(log.read_text())["metrics"] == {"curated": 3}
    # No writable termination log (outside Kubernetes): silently skipped.
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(tmp_path / "missing-dir" / "log"))
    publish(result, stage_uri)


def test_unwritable_result_turns_success_into_store_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination"
    monkeypatch.setenv("KUBEDISTILL_TERMINATION_LOG", str(log))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    published = publish(StageResult(stage=Stage.CURATE, ok=True), (blocker / "curate").as_uri())
    assert not published.ok and published.reason == "StoreUnreachable"
    assert json.loads(log.read_text())["reason"] == "StoreUnreachable"


def test_progress_is_throttled_and_estimates_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    stage_uri = (tmp_path / "generate").as_uri()
    progress = ProgressReporter(stage_uri, Stage.GENERATE, min_interval=2.0)
    assert progress.update(0, 100, detail="starting")
    now[0] += 1.0
    assert not progress.update(10, 100)  # within 2 s of the last write
    now[0] += 1.5
    assert progress.update(25, 100, cost_usd=0.5)
    written = store.read_json(f"{stage_uri}/progress.json")
    assert (written["done"], written["total"], written["costUSD"]) == (25, 100, 0.5)
    assert written["etaSeconds"] == pytest.approx(75 * 2.5 / 25)
    assert progress.update(100, 100, force=True)
    assert store.read_json(f"{stage_uri}/progress.json")["etaSeconds"] == 0.0


def test_redact_ignores_short_values() -> None:
    assert redact("key abcdef and x", ["abcdef"]) == "key *** and x"
    assert runtime.secret_values(
        {"KUBEDISTILL_TEACHER_API_KEY": "x", "AWS_SECRET_ACCESS_KEY": "longsecret"}
    ) == ["longsecret"]


def run_main(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(REPO / "operator" / "src"), str(REPO / "trainer-image" / "src")])
    return subprocess.run(
        [sys.executable, "-m", "kubedistill_trainer", *args],
        env={**os.environ, "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_main_usage_and_invalid_invocations(tmp_path: Path) -> None:
    assert run_main(["nonsense"], {}).returncode == 2
    log = tmp_path / "log"
    missing = run_main(["generate"], {"KUBEDISTILL_TERMINATION_LOG": str(log)})
    assert missing.returncode == 1
    assert json.loads(log.read_text())["reason"] == "InvalidInvocation"
    inv = invocation((tmp_path / "art").as_uri())
    mismatch = run_main(
        ["generate"],
        {"KUBEDISTILL_JOB": inv.model_dump_json(by_alias=True), "KUBEDISTILL_TERMINATION_LOG": str(log)},
    )
    assert mismatch.returncode == 1
    assert "invocation is for stage curate, not generate" in json.loads(log.read_text())["message"]


def test_data_stages_do_not_import_torch() -> None:
    """generate and curate run in small pods: they must not pay for torch or transformers."""
    path = os.pathsep.join([str(REPO / "operator" / "src"), str(REPO / "trainer-image" / "src")])
    code = (
        "import sys, kubedistill_trainer.__main__, kubedistill_trainer.generate, kubedistill_trainer.curate;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'boto3') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr
