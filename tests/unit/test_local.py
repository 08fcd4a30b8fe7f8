"""Local mode without models: job validation messages, the plan (uid, paths, secrets, presets), the
figures of the summary, resuming from results on disk, and stopping a child process cleanly."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill.api import jobfile
from kubedistill.api.models import STAGES, Artifacts, Metrics, Stage
from kubedistill.api.stage import StageProgress, StageResult
from kubedistill.cli import local as cli_local
from kubedistill.local import plan, presets, processes, runner

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"

JOB: dict[str, Any] = {
    "apiVersion": "kubedistill.io/v1alpha1",
    "kind": "DistillationJob",
    "metadata": {"name": "tickets"},
    "spec": {
        "teacher": {
            "model": "openai/gpt-4o-mini",
            "apiKeySecretRef": {"name": "openai", "key": "openai-api-key"},
        },
        "student": {"model": "qwen3-0.6b"},
        "dataset": {"uri": "file://rows.jsonl"},
        "curation": {"judge": {"majority": {}}},
    },
}


def write_job(tmp_path: Path, doc: dict[str, Any] | str = JOB) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc), encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text('{"id": "a", "prompt": "hello"}\n', encoding="utf-8")
    return path


def changed(**spec: Any) -> dict[str, Any]:
    return {**JOB, "spec": {**JOB["spec"], **spec}}


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            changed(curation={"topK": 5}),
            "spec.curation.topK: curation.topK must not exceed generation.nSamples",
        ),
        (changed(teacher={"model": "m", "modle": "x"}), "spec.teacher.modle: Extra inputs are not permitted"),
        (changed(export={"quantizations": ["q8_0", "q2_k"]}), "spec.export.quantizations[1]: "),
        (
            changed(training={"bondBeta": 1.5}),
            "spec.training.bondBeta: Input should be less than or equal to 1",
        ),
        (changed(dataset={"uri": "s3://b/k", "prompts": ["x"]}), "spec.dataset: exactly one of"),
        ({**JOB, "metadata": {"name": "Bad_Name"}}, "metadata.name: "),
    ],
)
def test_invalid_jobs_name_the_field(tmp_path: Path, doc: dict[str, Any], expected: str) -> None:
    with pytest.raises(jobfile.JobInvalid) as caught:
        jobfile.load_job(write_job(tmp_path, doc))
    assert any(line.startswith(expected) or expected in line for line in caught.value.lines), (
        caught.value.lines
    )


def test_yaml_errors_and_wrong_documents_are_reported_with_where(tmp_path: Path) -> None:
    with pytest.raises(jobfile.JobInvalid, match=r"line 4, column 1: expected the node content"):
        jobfile.load_job(write_job(tmp_path, "kind: DistillationJob\nspec:\n  teacher: [\n"))
    with pytest.raises(jobfile.JobInvalid, match="expected one DistillationJob, found \\['ModelAlias'\\]"):
        jobfile.load_job(write_job(tmp_path, "kind: ModelAlias\n"))
    with pytest.raises(jobfile.JobInvalid, match="No such file"):
        jobfile.load_job(tmp_path / "missing.yaml")


def test_uid_is_stable_per_name_and_preset() -> None:
    assert plan.stable_uid("a") == plan.stable_uid("a")
    assert len({plan.stable_uid("a"), plan.stable_uid("b"), plan.stable_uid("a", "smoke")}) == 3


def test_relative_file_uris_are_relative_to_the_job_file(tmp_path: Path) -> None:
    assert (
        jobfile.resolve_dataset_uri("file://data/rows.jsonl", tmp_path)
        == (tmp_path / "data/rows.jsonl").as_uri()
    )
    for kept in ("file:///abs/rows.jsonl", "s3://b/rows.jsonl", None):
        assert jobfile.resolve_dataset_uri(kept, tmp_path) == kept


def test_secrets_come_from_env_named_like_the_key_and_are_never_in_messages(tmp_path: Path) -> None:
    spec = jobfile.load_job(write_job(tmp_path)).spec
    assert plan.secret_env_names("openai-api-key") == ["openai-api-key", "OPENAI_API_KEY"]
    assert plan.secret_env(spec, {"OPENAI_API_KEY": "sk-abc123"}) == {
        "KUBEDISTILL_TEACHER_API_KEY": "sk-abc123"
    }
    assert plan.secret_env(spec, {"KUBEDISTILL_TEACHER_API_KEY": "sk-x"}) == {
        "KUBEDISTILL_TEACHER_API_KEY": "sk-x"
    }
    with pytest.raises(jobfile.JobInvalid) as caught:
        plan.secret_env(spec, {"UNRELATED": "sk-secret-value"})
    (line,) = caught.value.lines
    assert "OPENAI_API_KEY or KUBEDISTILL_TEACHER_API_KEY" in line and "sk-secret-value" not in line


def test_quickstart_job_is_valid_and_its_dataset_is_what_the_script_writes() -> None:
    job = jobfile.load_job(QUICKSTART / "job.yaml")
    assert job.spec.teacher.model == "local/smollm2-135m-instruct"
    assert job.spec.curation.judge.kind == "majority"
    assert job.spec.evaluation.judge is not None and job.spec.evaluation.judge.kind == "reference"
    assert job.spec.generation.system_prompt and "feature_request" in job.spec.generation.system_prompt
    spec = importlib.util.spec_from_file_location("make_tickets", QUICKSTART / "make_tickets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.make_rows(300)
    assert module.render(rows) == (QUICKSTART / "tickets.jsonl").read_text(encoding="utf-8")
    assert len({r["prompt"] for r in rows}) == 300
    assert {r["reference"] for r in rows} == set(module.LABELS)


def test_smoke_preset_is_a_valid_smaller_job() -> None:
    spec = jobfile.load_job(QUICKSTART / "job.yaml").spec
    smoke = presets.apply_preset(spec, "smoke")
    assert smoke.training.steps < spec.training.steps and smoke.dataset.num_prompts == 60
    assert smoke.curation.top_k <= smoke.generation.n_samples
    assert smoke.generation.system_prompt == spec.generation.system_prompt
    with pytest.raises(jobfile.JobInvalid, match="unknown preset"):
        presets.apply_preset(spec, "huge")


def result(stage: Stage, **kwargs: Any) -> StageResult:
    return StageResult(stage=stage, ok=True, **kwargs)


def test_figures_of_the_summary() -> None:
    state = runner.RunState(
        outcomes={
            Stage.GENERATE: runner.StageOutcome(
                Stage.GENERATE,
                result(
                    Stage.GENERATE,
                    metrics=Metrics(
                        teacher_calls=300,
                        teacher_input_tokens=240000,
                        teacher_output_tokens=900,
                        teacher_cost_total=0.0,
                        candidates=300,
                    ),
                ),
                seconds=61.0,
            ),
            Stage.EVALUATE: runner.StageOutcome(
                Stage.EVALUATE,
                result(
                    Stage.EVALUATE,
                    metrics=Metrics(eval_score=0.4, teacher_eval_score=0.5, retention=0.8),
                    artifacts=Artifacts(
                        eval_uri="file:///w/evaluate/eval.jsonl", gguf_uris={"q8_0": "file:///w/m.gguf"}
                    ),
                    details={
                        "rows": 40,
                        "judge": "reference",
                        "agreementExact": 0.75,
                        "studentTokensPerCall": 3.0,
                        "studentLatencyP50Sec": 0.12,
                        "studentLatencyP95Sec": 0.31,
                        "studentPromptTokensPerSecond": 850.0,
                        "studentDecodeTokensPerSecond": 95.5,
                    },
                ),
            ),
        },
        baseline={"baselineScore": 0.0, "studentPromptTokensPerCall": 40.0},
    )
    machine = {"cpu": "Test CPU", "cores": 2, "loadAvg1m": 0.5}
    f = runner.compute_figures(state, {"costUSD": 0.0, "inputTokens": 250000}, 123.4, machine)
    assert (f["teacherScore"], f["studentBefore"], f["studentAfter"], f["retention"]) == (0.5, 0.0, 0.4, 0.8)
    assert f["teacherPromptTokensPerCall"] == 800.0 and f["teacherAnswerTokensPerCall"] == 3.0
    assert f["studentPromptTokensPerCall"] == 40.0 and f["heldOutRows"] == 40
    assert f["estimatedInputTokens"] == 250000 and f["teacherInputTokens"] == 240000
    assert f["stageSeconds"] == {"generate": 61.0, "evaluate": 0.0} and f["wallTimeSec"] == 123.4
    rows = dict(cli_local.summary_rows(f))
    assert rows["student after training"] == "40.0%" and rows["student before training"] == "0.0%"
    assert rows["student gives the teacher's answer"] == "75.0%"
    assert rows["teacher input from its cache / saved (sync)"] == "0 (estimated –) / $0.0000"
    assert rows["latency per call p50 / p95, student"] == "0.12 s / 0.31 s"
    assert rows["llama.cpp prompt / decode tokens/s, student"] == "850 / 95.5"
    # A teacher whose server sends no llama.cpp timings (a paid provider): said, not shown as 0.
    assert (
        rows["llama.cpp prompt / decode tokens/s, teacher"] == "– (its server reports no llama.cpp timings)"
    )
    assert rows["measured on"] == "Test CPU, 2 cores, load average 0.5"
    assert dict(cli_local.artifact_paths(state)) == {
        "eval": "/w/evaluate/eval.jsonl",
        "gguf q8_0": "/w/m.gguf",
    }


def test_a_rerun_resumes_from_results_on_disk(tmp_path: Path) -> None:
    run = runner.LocalRun(
        job_file=write_job(tmp_path), workdir=tmp_path / "work", environ={"OPENAI_API_KEY": "k" * 8}
    )
    for stage in STAGES:
        d = run.dir / stage.value
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(result(stage).to_k8s()), encoding="utf-8")
        progress = StageProgress(stage=stage, done=1, total=1).to_k8s()
        (d / "progress.json").write_text(json.dumps(progress), encoding="utf-8")
    seen: list[tuple[Stage, str]] = []
    notes: list[str] = []
    state = run.execute(lambda s, p, what: seen.append((s, what)), notes.append)
    assert all(o.resumed for o in state.outcomes.values()) and set(state.outcomes) == set(STAGES)
    assert seen == [(s, "done earlier") for s in STAGES] and notes == []
    assert run.succeeded(state)
    assert json.loads((run.local_dir / "summary.json").read_text())["wallTimeSec"] >= 0
    # Seconds measured by the run that did the work survive an idle rerun.
    (run.local_dir / "timing.json").write_text(
        json.dumps({"stageSeconds": {"train": 42.0}, "wallTimeSec": 100.0})
    )
    again = run.execute(lambda *_: None, lambda _: None)
    assert again.outcomes[Stage.TRAIN].seconds == 42.0
    assert 100.0 <= run.figures["wallTimeSec"] < 110 and run.figures["stageSeconds"]["train"] == 42.0


def test_a_failed_stage_is_rerun_and_the_run_stops_there(tmp_path: Path) -> None:
    run = runner.LocalRun(
        job_file=write_job(tmp_path), workdir=tmp_path / "work", environ={"OPENAI_API_KEY": "k" * 8}
    )
    bad = run.dir / "estimate"
    bad.mkdir(parents=True)
    failed = StageResult(stage=Stage.ESTIMATE, ok=False, reason="StoreUnreachable", message="x")
    (bad / "result.json").write_text(json.dumps(failed.to_k8s()), encoding="utf-8")
    # Now every row is invalid: the estimate runs again, fails before any teacher is called, and
    # nothing runs after it.
    (tmp_path / "rows.jsonl").write_text('{"no": "prompt"}\n', encoding="utf-8")
    state = run.execute(lambda *_: None, lambda _: None)
    outcome = state.outcomes[Stage.ESTIMATE]
    assert outcome.result is not None and outcome.result.reason == "DatasetInvalid" and not outcome.resumed
    assert "line 1: exactly one of prompt or messages must be set" in outcome.result.message
    assert set(state.outcomes) == {Stage.ESTIMATE}
    invocation = json.loads((run.local_dir / "invocations" / "estimate.json").read_text())
    assert invocation["artifactBase"] == run.dir.as_uri() and invocation["job"]["uid"] == run.uid
    assert invocation["spec"]["dataset"]["uri"] == (tmp_path / "rows.jsonl").as_uri()
    assert "k" * 8 not in json.dumps(invocation)


STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *a: print("got SIGINT", flush=True))
signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(3)))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_stopping_a_child_escalates_from_sigint_to_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=f, start_new_session=True)
    deadline = time.monotonic() + 20
    while "ready" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes.stop_process(proc, (0.5, 5.0)) == 3
    assert out.read_text().splitlines() == ["ready", "got SIGINT", "got SIGTERM"]
