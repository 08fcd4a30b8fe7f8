"""The `kubedistill` CLI through typer's CliRunner: commands that need no cluster, exit codes, tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kubedistill.api.jobfile import parse_job as parse
from kubedistill.api.models import STAGES, Stage
from kubedistill.cli import app, render
from kubedistill.cli import estimate as cli_estimate
from kubedistill.local.plan import needs_teacher

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart" / "job.yaml"
runner = CliRunner()


def test_every_command_of_the_issue_is_there() -> None:
    out = runner.invoke(app, ["--help"]).output
    for command in (
        "apply", "get", "list", "describe", "wait", "artifacts", "logs", "estimate", "models", "alias",
        "suspend", "resume", "delete", "crds", "operator", "run",
    ):  # fmt: skip
        assert f" {command} " in out, command
    assert "set" in runner.invoke(app, ["alias", "--help"]).output


def test_run_needs_local() -> None:
    result = runner.invoke(app, ["run", str(QUICKSTART)])
    assert result.exit_code == 2 and "--local" in result.output


def test_run_with_an_invalid_job_exits_2_naming_the_field(tmp_path: Path) -> None:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["curation"]["topK"] = 9
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["run", str(bad), "--local", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2
    assert "spec.curation.topK: curation.topK must not exceed generation.nSamples" in result.output
    assert not (tmp_path / "w").exists()


def test_run_with_a_missing_secret_says_which_env_to_set_and_prints_no_secret(tmp_path: Path) -> None:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["teacher"] = {
        "model": "openai/gpt-4o",
        "apiKeySecretRef": {"name": "openai", "key": "api-key"},
    }
    (tmp_path / "tickets.jsonl").write_text('{"id": "a", "prompt": "x"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    result = runner.invoke(
        app,
        ["run", str(job), "--local", "--workdir", str(tmp_path / "w")],
        env={"UNRELATED_TOKEN": "sk-verysecret"},
    )
    assert result.exit_code == 2
    assert "API_KEY or KUBEDISTILL_TEACHER_API_KEY" in result.output.replace("\n", "")
    assert "sk-verysecret" not in result.output


def test_estimate_is_offline_and_counts_the_quickstart_dataset() -> None:
    result = runner.invoke(app, ["estimate", "-f", str(QUICKSTART), "-o", "json"])
    assert result.exit_code == 0, result.output
    est = json.loads(result.output)
    spec = parse(QUICKSTART.read_text()).spec
    assert est["teacher_calls"] == 200 * spec.generation.n_samples  # local teachers have no `n`
    assert est["estimated_cost"] == 0.0 and est["tier"] == "local"
    # The long few-shot instruction is counted: hundreds of input tokens per call.
    assert est["input_tokens"] / est["teacher_calls"] > 300
    table = runner.invoke(app, ["estimate", "-f", str(QUICKSTART)])
    assert table.exit_code == 0 and "estimated cost" in table.output


def quickstart_with_teacher(tmp_path: Path, teacher: dict[str, str]) -> Path:
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["teacher"] = teacher
    (tmp_path / "tickets.jsonl").write_bytes((QUICKSTART.parent / "tickets.jsonl").read_bytes())
    job = tmp_path / f"job-{teacher.get('mode', 'sync')}.yaml"
    job.write_text(yaml.safe_dump(doc))
    return job


def test_estimate_says_the_teacher_mode_and_prices_batch_at_the_batch_price(tmp_path: Path) -> None:
    found = {}
    for mode in ("sync", "batch"):
        job = quickstart_with_teacher(tmp_path, {"model": "openai/gpt-4.1-mini", "mode": mode})
        result = runner.invoke(app, ["estimate", "-f", str(job), "-o", "json"])
        assert result.exit_code == 0, result.output
        found[mode] = json.loads(result.output)
        assert found[mode]["teacher_mode"] == mode
    assert found["batch"]["teacher_cost"] == pytest.approx(found["sync"]["teacher_cost"] / 2, rel=1e-3)
    # teacher_cost is rounded to the millionth of a dollar, the breakdown is not.
    assert found["batch"]["breakdown"]["teacherCostAtSyncPriceUSD"] == pytest.approx(
        found["sync"]["teacher_cost"], rel=1e-4
    )
    table = runner.invoke(app, ["estimate", "-f", str(job)])
    assert table.exit_code == 0 and "(batch, 0 input tokens from the provider's cache" in table.output


def test_estimate_of_batch_mode_without_a_batch_api_exits_2_naming_the_field(tmp_path: Path) -> None:
    job = quickstart_with_teacher(tmp_path, {"model": "local/smollm2-135m-instruct", "mode": "batch"})
    result = runner.invoke(app, ["estimate", "-f", str(job)])
    assert result.exit_code == 2
    assert (
        "spec.teacher.mode: teacher.mode batch: the catalog lists no batch API for local/smollm2-135m-instruct"
        in (result.output.replace("\n", ""))
    )


def test_estimate_of_a_large_file_reports_its_reading_and_bad_lines(tmp_path: Path) -> None:
    """`kubedistill estimate -f` runs the estimate stage's streaming code: progress while it reads,
    malformed lines counted and skipped, the job refused past half of them, as the stage would."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            "{broken\n" if i % 20 == 0 else json.dumps({"id": i, "prompt": f"p {i}"}) + "\n"
            for i in range(25_000)
        )
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        "apiVersion: kubedistill.io/v1alpha1\nkind: DistillationJob\nmetadata: {name: big}\nspec:\n"
        "  teacher: {model: openai/gpt-4o-mini}\n  student: {model: qwen3-0.6b}\n"
        "  dataset: {uri: file://rows.jsonl}\n"
    )
    seen: list[tuple[int, int, int]] = []
    result = cli_estimate.estimate_file(job, lambda *a: seen.append(a))
    assert result["teacher_calls"] == 23_750
    assert result["breakdown"]["datasetRows"] == {"valid": 23_750, "invalid": 1_250}
    assert len(seen) >= 3 and seen[-1][0] == seen[-1][1] == rows.stat().st_size and seen[-1][2] == 25_000
    assert [s[2] for s in seen] == sorted(s[2] for s in seen)
    rows.write_text("{broken\n" * 3 + json.dumps({"prompt": "one"}) + "\n")
    refused = runner.invoke(app, ["estimate", "-f", str(job)])
    assert refused.exit_code == 2 and "3 of 4 dataset rows are invalid" in refused.output.replace("\n", "")


def test_estimate_of_an_invalid_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: DistillationJob\nmetadata: {name: x}\nspec: {}\n")
    result = runner.invoke(app, ["estimate", "-f", str(bad)])
    assert result.exit_code == 2 and "spec.teacher: Field required" in result.output


def test_models_lists_the_catalogs() -> None:
    teachers = json.loads(runner.invoke(app, ["models", "teachers", "-o", "json"]).output)
    assert {"openai", "anthropic", "google", "deepseek", "groq", "mistral", "together"} <= {
        t["provider"] for t in teachers
    }
    students = runner.invoke(app, ["models", "students"])
    assert (
        students.exit_code == 0 and "qwen3-0.6b" in students.output and "Qwen/Qwen3-0.6B" in students.output
    )


def test_cluster_commands_without_a_cluster_fail_with_a_message(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "none.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    result = runner.invoke(app, ["get", "--kubeconfig", str(kubeconfig)])
    assert result.exit_code == 1 and "no cluster to talk to" in result.output


def test_get_rows_follow_the_printer_columns() -> None:
    obj = {
        "metadata": {"name": "triage", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"teacher": {"model": "openai/gpt-4o"}, "student": {"model": "qwen3-0.6b"}},
        "status": {
            "phase": "Training",
            "progress": {"stage": "train", "percent": 62.5},
            "metrics": {"teacherCostTotal": 1.23456, "evalScore": None},
            "conditions": [
                {"type": "Ready", "status": "False", "message": "stage train running"},
                {"type": "Queued", "status": "True", "reason": "Pending"},
            ],
        },
    }
    header, rows = render.job_rows([obj], wide=True)
    assert header == [
        "NAME", "PHASE", "PROGRESS", "QUEUED", "TEACHER", "STUDENT", "COST", "EVAL", "AGE", "MESSAGE"
    ]  # fmt: skip
    assert rows[0][:8] == ["triage", "Training", "62%", "True", "openai/gpt-4o", "qwen3-0.6b", "1.2346", ""]
    assert rows[0][9] == "stage train running"


def test_age_like_kubectl() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert render.age("2026-01-02T03:04:00Z", now) == "5s"
    assert render.age("2026-01-02T02:50:05Z", now) == "14m"
    assert render.age("2026-01-01T01:04:05Z", now) == "1d"
    assert render.age(None, now) == "<unknown>"


@pytest.mark.parametrize(
    ("stage", "percent", "fraction"),
    [
        (Stage.ESTIMATE, 1.0, 0.5),
        (Stage.GENERATE, 18.5, 0.5),
        (Stage.CURATE, 35.0, 0.0),
        (Stage.TRAIN, 67.5, 0.5),
        (Stage.EVALUATE, 100.0, 1.0),
    ],
)
def test_stage_bars_come_from_the_whole_pipeline_percent(
    stage: Stage, percent: float, fraction: float
) -> None:
    assert render.stage_fraction(stage, percent) == pytest.approx(fraction)


def test_only_stages_that_call_the_teacher_start_a_local_teacher() -> None:
    spec = parse(QUICKSTART.read_text()).spec
    assert [s for s in STAGES if needs_teacher(s, spec)] == [Stage.GENERATE]
    llm = type(spec).model_validate(
        {**spec.to_k8s(), "curation": {"judge": {"llm": {}}, "topK": 1}, "evaluation": {}}
    )
    assert [s for s in STAGES if needs_teacher(s, llm)] == [Stage.GENERATE, Stage.CURATE, Stage.EVALUATE]


class _OneJob:
    """What `describe_job` reads from the SDK: the object and its events."""

    def __init__(self, obj: dict[str, object]) -> None:
        self.obj = obj

    def raw(self, name: str) -> dict[str, object]:
        return self.obj

    def events(self, name: str) -> list[dict[str, str]]:
        return []


def test_describe_names_the_queue_and_kueues_reason(capsys: pytest.CaptureFixture[str]) -> None:
    obj = {
        "metadata": {"name": "triage", "namespace": "ml", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "teacher": {"model": "openai/gpt-4o"},
            "student": {"model": "qwen3-0.6b"},
            "queueName": "gpu",
        },
        "status": {
            "phase": "Training",
            "conditions": [
                {"type": "Queued", "status": "True", "reason": "Pending", "message": "insufficient quota"}
            ],
        },
    }
    render.describe_job(_OneJob(obj), "triage")  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "Queue:      gpu (Kueue LocalQueue)" in out
    assert "Queued" in out and "Pending" in out and "insufficient quota" in out
