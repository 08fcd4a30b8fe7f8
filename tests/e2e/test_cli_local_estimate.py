"""The quick start's estimate against what its real teacher reports: 30 tickets through the generate stage with
SmolLM2 served by llama-cpp-python, as local mode runs it; the estimated input tokens (counted with the
model's tokenizer) must be within ±15% of the usage the server reports."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from kubedistill.api import jobfile
from kubedistill.api.models import Stage
from kubedistill.local import models as local_models
from kubedistill.local import plan, processes, runner

pytestmark = pytest.mark.slow

JOB = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "job.yaml"


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python (gguf extra)"
)
def test_estimate_is_within_15_percent_of_the_teachers_usage(tmp_path: Path) -> None:
    run = runner.LocalRun(job_file=JOB, workdir=tmp_path, environ={})
    spec = run.spec.model_copy(
        update={
            "dataset": run.spec.dataset.model_copy(update={"num_prompts": 30}),
            "generation": run.spec.generation.model_copy(update={"n_samples": 1}),
        }
    )
    run.spec = spec
    try:
        gguf = local_models.local_gguf("smollm2-135m-instruct")
    except jobfile.JobInvalid as err:
        pytest.skip(str(err))
    student = run.student_dir()
    with run.teacher() as url:
        effective = plan.effective_spec(spec, url, student)
        ran = run.run_stage(Stage.ESTIMATE, effective, lambda *_: None, lambda _: None)
        estimate = runner.estimate_summary(ran)
        result = processes.run_stage_process(
            plan.invocation(run.name, run.uid, effective, Stage.GENERATE, run.base),
            run.local_dir,
            dict(os.environ),
            lambda *_: None,
            lambda: False,
        )
    assert gguf.is_file() and estimate["tokenCounting"] == "tokenizer"
    assert result is not None and result.ok, result
    actual = result.metrics.teacher_input_tokens
    assert actual and result.metrics.teacher_calls == estimate["teacherCalls"] == 30
    assert abs(estimate["inputTokens"] - actual) / actual <= 0.15, (estimate, actual)
    # The student is the teacher's own model here: its chat template renders each request (few-shot
    # turns included) exactly as the teacher's server does, so the count is exact.
    assert estimate["inputTokens"] == actual, (estimate, actual)
    # Output is bounded by maxTokens: never under what the teacher said.
    assert estimate["outputTokens"] >= (result.metrics.teacher_output_tokens or 0)
