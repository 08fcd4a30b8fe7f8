"""The child processes of local mode: stage programs, the baseline scorer and the teacher's server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.api.stage import (
    JOB_FILE_ENV,
    PROGRESS_FILE,
    RESULT_FILE,
    TERMINATION_LOG_ENV,
    StageInvocation,
    StageProgress,
    StageResult,
)

STOP_GRACE_S = (10.0, 5.0)  # after SIGINT, after SIGTERM
SERVER_START_TIMEOUT_S = 180.0

ProgressFn = Callable[[Stage, StageProgress | None, str], None]


def read_result(base: str, stage: Stage) -> StageResult | None:
    return store.read_model(f"{base}/{stage.value}/{RESULT_FILE}", StageResult)


def read_progress(base: str, stage: Stage) -> StageProgress | None:
    return store.read_model(f"{base}/{stage.value}/{PROGRESS_FILE}", StageProgress)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(args: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A child in its own process group (so a stop reaches all it started), output appended to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            start_new_session=True,
        )


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
        sys.executable, "-m", "kubedistill.local.llama_server",
        "--model", str(gguf),
        "--model_alias", alias,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", "4096",
        "--n_threads", str(threads or os.cpu_count() or 2),
    ]  # fmt: skip
    proc = spawn(cmd, log_path)
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
    proc = spawn([sys.executable, "-m", "kubedistill_trainer", stage.value], log_path, child_env)
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
    proc = spawn(
        [sys.executable, "-m", "kubedistill.local", "baseline", str(inv_path), str(out)], log_path, env
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
