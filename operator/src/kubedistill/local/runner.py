"""One local run of a job file: the stages in order as child processes, resumable, with the figures
of the summary. The CLI (`kubedistill run --local`) shows it; this module only drives it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubedistill.api.jobfile import JobInvalid, load_job, with_dataset_path
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import StageResult
from kubedistill.domain.plan import retry_delay, stages_to_run
from kubedistill.local.models import ensure_hf_student, local_gguf
from kubedistill.local.plan import (
    LOCAL_PREFIX,
    effective_spec,
    invocation,
    needs_teacher,
    run_dir,
    secret_env,
    spec_fingerprint,
    stable_uid,
)
from kubedistill.local.presets import apply_preset, smoke_student, smoke_teacher
from kubedistill.local.processes import (
    ProgressFn,
    llama_server,
    read_progress,
    read_result,
    run_baseline_process,
    run_stage_process,
)
from kubedistill.machine import describe
from kubedistill.settings import Settings, from_mapping

TIMING_FILE = "timing.json"


@dataclass
class StageOutcome:
    stage: Stage
    result: StageResult | None
    resumed: bool = False
    seconds: float = 0.0


@dataclass
class RunState:
    outcomes: dict[Stage, StageOutcome] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None
    interrupted: bool = False


class Interrupted(Exception):
    pass


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return round(a / b, 1) if a is not None and b else None


def estimate_summary(result: StageResult | None) -> dict[str, Any]:
    """What the summary shows of the estimate stage's result; empty when it has none."""
    if result is None or result.estimate is None:
        return {}
    e = result.estimate
    return {
        "costUSD": round(e.teacher_cost_usd + e.judge_cost_usd, 6),
        "teacherCalls": e.teacher_calls,
        "inputTokens": e.input_tokens,
        "outputTokens": e.output_tokens,
        "cachedInputTokens": e.cached_input_tokens,
        "teacherMode": e.teacher_mode,
        "tokenCounting": result.details.get("tokenCounting"),
        "counting": result.details.get("counting"),
        "gpuMinutes": e.gpu_minutes,
    }


def compute_figures(
    state: RunState, estimate: Mapping[str, Any], wall_s: float, machine: Mapping[str, Any]
) -> dict[str, Any]:
    """The numbers the summary table shows (and local/summary.json keeps)."""
    res = {s: o.result for s, o in state.outcomes.items() if o.result is not None}
    gen, ev, tr = res.get(Stage.GENERATE), res.get(Stage.EVALUATE), res.get(Stage.TRAIN)
    gm = gen.metrics if gen else None
    ed = ev.details if ev else {}
    base = state.baseline or {}
    return {
        "teacherCalls": gm.teacher_calls if gm else None,
        "teacherCostUSD": gm.teacher_cost_total if gm else None,
        "estimatedCostUSD": estimate.get("costUSD"),
        "teacherInputTokens": gm.teacher_input_tokens if gm else None,
        "estimatedInputTokens": estimate.get("inputTokens"),
        "teacherOutputTokens": gm.teacher_output_tokens if gm else None,
        "estimatedOutputTokens": estimate.get("outputTokens"),
        "teacherCachedInputTokens": (gm.teacher_cached_input_tokens or 0) if gm else None,
        "estimatedCachedInputTokens": estimate.get("cachedInputTokens"),
        "teacherMode": estimate.get("teacherMode"),
        "teacherSavingUSD": gm.teacher_saving_usd if gm else None,
        "candidates": gm.candidates if gm else None,
        "curated": res[Stage.CURATE].metrics.curated if Stage.CURATE in res else None,
        "lossFinal": tr.metrics.student_loss_final if tr else None,
        "trainingTimeSec": tr.metrics.training_time_sec if tr else None,
        "heldOutRows": ed.get("rows"),
        "judge": ed.get("judge"),
        "teacherScore": ev.metrics.teacher_eval_score if ev else None,
        "studentBefore": base.get("baselineScore"),
        "studentAfter": ev.metrics.eval_score if ev else None,
        "retention": ev.metrics.retention if ev else None,
        "agreementWithTeacher": ed.get("agreementExact"),
        "teacherPromptTokensPerCall": _ratio(gm.teacher_input_tokens, gm.teacher_calls) if gm else None,
        "teacherAnswerTokensPerCall": _ratio(gm.teacher_output_tokens, gm.candidates) if gm else None,
        "studentPromptTokensPerCall": base.get("studentPromptTokensPerCall"),
        "studentAnswerTokensPerCall": ed.get("studentTokensPerCall"),
        "studentAnswerTokensPerCallBefore": base.get("studentTokensPerCall"),
        "teacherLatencyP50Sec": gm.teacher_latency_p50_sec if gm else None,
        "teacherLatencyP95Sec": gm.teacher_latency_p95_sec if gm else None,
        "teacherPromptTokensPerSecond": gm.teacher_prompt_tokens_per_second if gm else None,
        "teacherDecodeTokensPerSecond": gm.teacher_decode_tokens_per_second if gm else None,
        "studentLatencyP50Sec": ed.get("studentLatencyP50Sec"),
        "studentLatencyP95Sec": ed.get("studentLatencyP95Sec"),
        "studentPromptTokensPerSecond": ed.get("studentPromptTokensPerSecond"),
        "studentDecodeTokensPerSecond": ed.get("studentDecodeTokensPerSecond"),
        "stageSeconds": {s.value: round(o.seconds, 1) for s, o in state.outcomes.items()},
        "wallTimeSec": round(wall_s, 1),
        # Times mean little without the machine and its load: measured at the end of the run.
        "machine": machine,
    }


@dataclass
class LocalRun:
    """One local run of a job file; `execute` drives it, `ui` shows it."""

    job_file: Path
    workdir: Path
    preset: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stop: bool = False
    figures: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Retry backoff and the like, from the same KUBEDISTILL_* settings the operator reads.
        self.settings: Settings = from_mapping(self.environ)
        self.job = load_job(self.job_file)
        self.spec = with_dataset_path(apply_preset(self.job.spec, self.preset), self.job_file.parent)
        self.name = self.job.metadata.name
        self.uid = stable_uid(self.name, self.preset)
        self.dir = run_dir(self.workdir, self.name, self.uid)
        self.base = self.dir.as_uri()
        self.local_dir = self.dir / "local"
        self.secrets = secret_env(self.spec, self.environ)
        if self.spec.dataset.config_map_ref is not None:
            raise JobInvalid(
                ["spec.dataset.configMapRef: needs a cluster; use dataset.uri or prompts locally"]
            )

    def stages(self) -> list[Stage]:
        return stages_to_run(self.spec)

    def child_env(self) -> dict[str, str]:
        # A key named only by KUBEDISTILL_*_API_KEY in the user's env still reaches the stages;
        # one resolved from a Secret key name is added explicitly.
        return {**self.environ, **self.secrets}

    @contextmanager
    def teacher(self) -> Iterator[str | None]:
        """The base URL to give the stages: a loopback server for `local/` teachers (or smoke)."""
        model = self.spec.teacher.model
        if self.preset == "smoke":
            with smoke_teacher(self.spec) as url:
                yield url
        elif model.startswith(LOCAL_PREFIX) and self.spec.teacher.base_url is None:
            name = model.removeprefix(LOCAL_PREFIX)
            with llama_server(local_gguf(name), name, self.local_dir / "logs" / "teacher-server.log") as url:
                yield url
        else:
            yield None

    def student_dir(self) -> Path | None:
        if self.preset == "smoke":
            return smoke_student()
        model = self.spec.student.model
        if model.startswith(LOCAL_PREFIX):
            return ensure_hf_student(model.removeprefix(LOCAL_PREFIX), self.local_dir, self.child_env())
        return None

    def load_timing(self) -> dict[str, Any]:
        """Seconds spent so far: per stage (its last run) and in all runs of this job together."""
        path = self.local_dir / TIMING_FILE
        if path.is_file():
            kept: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            return kept
        return {"stageSeconds": {}, "wallTimeSec": 0.0}

    def check_spec(self, kept: bool) -> str | None:
        """A warning when the job changed since the stages already done (`kept`) were run."""
        path = self.local_dir / "spec.sha256"
        now = spec_fingerprint(self.spec)
        before = path.read_text(encoding="utf-8").strip() if path.is_file() else None
        self.local_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(now, encoding="utf-8")
        if kept and before is not None and before != now:
            return "the job changed since the last run: finished stages are kept (rerun with --fresh to redo them)"
        return None

    def execute(self, on_progress: ProgressFn, on_note: Callable[[str], None]) -> RunState:
        state = RunState()
        started = time.monotonic()
        pending = [s for s in self.stages() if not ((r := read_result(self.base, s)) and r.ok)]
        warning = self.check_spec(kept=len(pending) < len(self.stages()))
        if warning:
            on_note(f"[yellow]{warning}")
        timing = self.load_timing()
        for stage in self.stages():
            if stage not in pending:
                seconds = timing["stageSeconds"].get(stage.value, 0.0)
                state.outcomes[stage] = StageOutcome(stage, read_result(self.base, stage), True, seconds)
                on_progress(stage, read_progress(self.base, stage), "done earlier")
        spec = self.spec
        teacher_needed = any(needs_teacher(stage, self.spec) for stage in pending)
        with self.teacher() if teacher_needed else _nothing() as teacher_url:
            student = self.student_dir() if pending or self.baseline_due(state) else None
            spec = effective_spec(self.spec, teacher_url, student)
            for stage in pending:
                if self.stop:
                    state.interrupted = True
                    break
                t0 = time.monotonic()
                result = self.run_stage(stage, spec, on_progress, on_note)
                state.outcomes[stage] = StageOutcome(stage, result, seconds=time.monotonic() - t0)
                timing["stageSeconds"][stage.value] = round(time.monotonic() - t0, 1)
                if result is None:
                    state.interrupted = True
                    break
                if not result.ok:
                    break
                if stage == Stage.ESTIMATE:
                    on_note(f"estimate: {result.message}")
        if self.baseline_due(state) and not self.stop:
            on_note("scoring the untrained student on the same held-out rows (baseline)…")
            inv = invocation(self.name, self.uid, spec, Stage.EVALUATE, self.base)
            state.baseline = run_baseline_process(inv, self.local_dir, self.child_env())
        timing["wallTimeSec"] = round(timing["wallTimeSec"] + time.monotonic() - started, 1)
        (self.local_dir / TIMING_FILE).write_text(json.dumps(timing, indent=2), encoding="utf-8")
        self.estimate = estimate_summary(read_result(self.base, Stage.ESTIMATE))
        self.figures = compute_figures(state, self.estimate, timing["wallTimeSec"], describe())
        if self.succeeded(state):
            (self.local_dir / "summary.json").write_text(json.dumps(self.figures, indent=2), encoding="utf-8")
        return state

    def run_stage(
        self, stage: Stage, spec: DistillationJobSpec, on_progress: ProgressFn, on_note: Callable[[str], None]
    ) -> StageResult | None:
        """One stage, tried again after a failure as the operator would; None when the user stopped it."""
        attempt = 1
        while True:
            inv = invocation(self.name, self.uid, spec, stage, self.base).model_copy(
                update={"attempt": attempt}
            )
            result = run_stage_process(inv, self.local_dir, self.child_env(), on_progress, lambda: self.stop)
            if result is None or result.ok:
                return result
            delay = retry_delay(attempt, self.spec, self.settings)
            if delay is None:
                return result
            on_note(
                f"[yellow]{stage.value} attempt {attempt} failed ({result.reason}: {result.message}); "
                f"retrying in {delay:.0f} s"
            )
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if self.stop:
                    return None
                time.sleep(min(0.2, deadline - time.monotonic()))
            attempt += 1

    def baseline_due(self, state: RunState) -> bool:
        ev = state.outcomes.get(Stage.EVALUATE)
        return bool(
            self.spec.evaluation.enabled
            and ev
            and ev.result
            and ev.result.ok
            and ev.result.details.get("rows")
        )

    def succeeded(self, state: RunState) -> bool:
        return all(
            (o := state.outcomes.get(s)) is not None and o.result is not None and o.result.ok
            for s in self.stages()
        )


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
