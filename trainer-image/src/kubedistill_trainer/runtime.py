"""The stage runner: the thin I/O shell every stage runs in (DESIGN §3).

A stage is a function `run(inv: StageInvocation) -> StageResult`. `run_stage(fn)` does the rest:

- loads the invocation (env KUBEDISTILL_JOB or KUBEDISTILL_JOB_FILE),
- runs `fn`; an exception becomes a failed `StageResult` whose `reason` is the exception's `reason`
  attribute when it has one (`StageFailure`, `kubedistill.store.StoreUnreachable`, ...) and
  `StageError` otherwise,
- writes `<stage_uri>/result.json` through the store and the compact result to the termination log
  (env KUBEDISTILL_TERMINATION_LOG, default /dev/termination-log; skipped when not writable),
- exits 0 when the result is ok, 1 otherwise.

Secret values (API keys, S3 credentials, taken from the env names of the stage contract) are
scrubbed from every message and log line, whatever a library or a provider put in them.

`ProgressReporter` writes `<stage_uri>/progress.json` (a `StageProgress`) at most every
`min_interval` seconds; the operator (or local mode) polls it, so stage pods need no RBAC.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

from pydantic import ValidationError

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.api.stage import (
    DEFAULT_TERMINATION_LOG,
    JUDGE_API_KEY_ENV,
    PROGRESS_FILE,
    RESULT_FILE,
    S3_ACCESS_KEY_ENV,
    S3_SECRET_KEY_ENV,
    TEACHER_API_KEY_ENV,
    TERMINATION_LOG_ENV,
    StageInvocation,
    StageProgress,
    StageResult,
    load_invocation,
)

log = logging.getLogger("kubedistill_trainer")
T = TypeVar("T")

SECRET_ENVS = (TEACHER_API_KEY_ENV, JUDGE_API_KEY_ENV, S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV)
# Short values ("x", "1") would redact half of every message; real keys are longer.
_MIN_SECRET_LEN = 6


class StageFailure(Exception):
    """Raise from a stage to fail it with a specific CamelCase reason and a user-facing message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    return [v for k in SECRET_ENVS if len(v := env.get(k, "")) >= _MIN_SECRET_LEN]


def redact(text: str, secrets: list[str] | None = None) -> str:
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Per-request lines from httpx would flood the pod log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def failure(stage: Stage, exc: BaseException) -> StageResult:
    """The failed result for an exception: its `reason` attribute, else StageError; message redacted."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str) or not reason:
        reason = "StageError"
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    return StageResult(stage=stage, ok=False, reason=reason, message=redact(message)[:4000])


def execute(fn: Callable[[StageInvocation], StageResult], inv: StageInvocation) -> StageResult:
    """Run `fn` and always return a result; never raises (except KeyboardInterrupt/SystemExit)."""
    try:
        result = fn(inv)
    except Exception as exc:
        log.exception("stage %s failed", inv.stage.value)
        return failure(inv.stage, exc)
    return result.model_copy(update={"message": redact(result.message)})


def write_termination_log(result: StageResult, environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    path = env.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(result.termination_message())
    except OSError:
        # Outside Kubernetes there is no /dev/termination-log; result.json is the full record.
        pass


def publish(result: StageResult, stage_uri: str | None) -> StageResult:
    """Write result.json (when there is a store to write to) and the termination log.

    When result.json cannot be written, the termination log carries a StoreUnreachable failure
    instead so the operator still learns why.
    """
    if stage_uri is not None:
        try:
            store.write_json(f"{stage_uri}/{RESULT_FILE}", result.to_k8s())
        except store.StoreError as exc:
            log.error("cannot write %s: %s", RESULT_FILE, redact(str(exc)))
            if result.ok:
                result = failure(result.stage, exc)
            else:
                result = result.model_copy(update={"message": f"{result.message} (and {redact(str(exc))})"})
    write_termination_log(result)
    return result


def run_stage(fn: Callable[[StageInvocation], StageResult], stage: Stage | None = None) -> NoReturn:
    """Entry point of a stage process: load, run, publish, exit 0/1."""
    configure_logging()
    try:
        inv = load_invocation()
        if stage is not None and inv.stage != stage:
            raise StageFailure(
                "InvalidInvocation", f"invocation is for stage {inv.stage.value}, not {stage.value}"
            )
    except (ValidationError, RuntimeError, OSError, StageFailure) as exc:
        result = failure(stage or Stage.GENERATE, exc)
        if not isinstance(exc, StageFailure):
            result = result.model_copy(update={"reason": "InvalidInvocation"})
        log.error("%s", result.message)
        publish(result, None)
        sys.exit(1)
    log.info("stage %s of %s/%s attempt %d", inv.stage.value, inv.job.namespace, inv.job.name, inv.attempt)
    # Of a distributed stage's ranks (torchrun's RANK) only rank 0 writes result.json; the others'
    # outcome is their exit status and termination log.
    writes_result = os.environ.get("RANK", "0") == "0"
    result = publish(execute(fn, inv), inv.report_uri() if writes_result else None)
    log.info(
        "stage %s %s: %s %s", inv.stage.value, "ok" if result.ok else "failed", result.reason, result.message
    )
    sys.exit(0 if result.ok else 1)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is installed (the trainer image has it): about half the CPU
    per teacher request, which is what bounds generation throughput at high concurrency."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressReporter:
    """Writes progress.json at most every `min_interval` seconds (always on `force`).

    ETA is extrapolated from the rate since the first `update` with done > 0; a failed write is
    logged and ignored, because progress must never fail a stage.
    """

    def __init__(self, stage_uri: str, stage: Stage, *, min_interval: float = 2.0) -> None:
        self.uri = f"{stage_uri}/{PROGRESS_FILE}"
        self.stage = stage
        self.min_interval = min_interval
        self._last_write = 0.0
        self._start: tuple[float, int] | None = None
        self.last: StageProgress | None = None

    def update(
        self,
        done: int,
        total: int,
        *,
        detail: str = "",
        cost_usd: float = 0.0,
        loss: float | None = None,
        force: bool = False,
    ) -> bool:
        """Record progress; returns whether it was written now."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, done)
        # Called once per answer in generate: build nothing until a write is due.
        if not force and now - self._last_write < self.min_interval:
            return False
        self._last_write = now
        self.last = StageProgress(
            stage=self.stage,
            done=done,
            total=total,
            detail=detail,
            cost_usd=cost_usd,
            loss=loss,
            eta_seconds=self._eta(now, done, total),
            updated_at=now_rfc3339(),
        )
        try:
            store.write_json(self.uri, self.last.to_k8s())
        except store.StoreError as exc:
            log.warning("cannot write progress: %s", redact(str(exc)))
            return False
        return True

    def _eta(self, now: float, done: int, total: int) -> float | None:
        assert self._start is not None
        start_time, start_done = self._start
        elapsed, advanced = now - start_time, done - start_done
        if advanced <= 0 or elapsed <= 0 or total <= done:
            return 0.0 if total and done >= total else None
        return round((total - done) * elapsed / advanced, 1)
