"""Helpers shared by the train / export / evaluate / pipeline tests: invocations and stage processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubedistill import store
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import (
    JOB_ENV,
    RESULT_FILE,
    TERMINATION_LOG_ENV,
    JobRef,
    StageInvocation,
    StageResult,
)

REPO = Path(__file__).resolve().parents[2]


def job_spec(student: Path | str, **sections: Any) -> DistillationJobSpec:
    """A small job: the tiny student, few steps, short sequences; `sections` override spec sections
    (`training` is merged into the small defaults, every other section replaces what is there)."""
    doc: dict[str, Any] = {
        "teacher": {"model": "fake-teacher"},
        "student": {"model": str(student)},
        "dataset": {"prompts": ["unused"]},
        "training": {
            "steps": 4,
            "batchSize": 2,
            "checkpointEvery": 2,
            "maxSeqLength": 64,
            "learningRate": 1e-3,
            "lora": {"r": 8, "alpha": 16},
        },
    }
    for key, value in sections.items():
        doc[key] = {**doc["training"], **value} if key == "training" else value
    return DistillationJobSpec.model_validate(doc)


def invocation(base: str, stage: Stage, spec: DistillationJobSpec) -> StageInvocation:
    return StageInvocation(
        job=JobRef(name="tiny", namespace="tests", uid="0000-tiny"),
        spec=spec,
        stage=stage,
        artifact_base=base,
    )


def curated_rows(n: int) -> list[dict[str, Any]]:
    """Arithmetic prompts with two good answers; two in three also carry wrong (rejected) ones."""
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "id": f"q{i}",
            "prompt": f"What is {i} plus {i}?",
            "chosen": [{"text": f"The answer is {2 * i}.", "score": 1.0}, {"text": f"{2 * i}", "score": 0.9}],
            "rejected": [],
        }
        if i % 3:
            row["rejected"] = [{"text": f"It is {i + 7}.", "score": 0.0}, {"text": "No idea.", "score": 0.1}]
        rows.append(row)
    return rows


def stage_env(inv: StageInvocation, tmp: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        JOB_ENV: inv.model_dump_json(by_alias=True),
        TERMINATION_LOG_ENV: str(tmp / f"termination-{inv.stage.value}"),
        # One thread each: the CI machine's two cores are shared, and oversubscribed BLAS threads crawl.
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator/src"), str(REPO / "trainer-image/src")]),
        **(extra or {}),
    }
    return env


def start_stage(
    inv: StageInvocation, tmp: Path, extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubedistill_trainer", inv.stage.value],
        env=stage_env(inv, tmp, extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_stage(inv: StageInvocation, tmp: Path, timeout: float = 300.0) -> tuple[StageResult, str]:
    """Run a stage as its own process, as a pod would; return its result.json and its log."""
    proc = start_stage(inv, tmp)
    out, _ = proc.communicate(timeout=timeout)
    result = StageResult.model_validate(store.read_json(f"{inv.stage_uri()}/{RESULT_FILE}"))
    assert (proc.returncode == 0) == result.ok, out[-4000:]
    return result, out
