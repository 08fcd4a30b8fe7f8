"""Local mode serves: llama.cpp's `llama-server` for the trained GGUF and LiteLLM's proxy in front of it,
both on loopback, the proxy with the config the operator would render (builders.gateway), so
`model=<alias>` answers on this machine exactly as through the cluster's gateway.

The binaries come from PATH or the virtualenv's bin directory (scripts/bootstrap.sh builds
llama-server from the llama.cpp source the llama-cpp-python sdist vendors, and installs LiteLLM's
proxy in a virtualenv of its own, linking both there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from kubedistill.api.models import Stage
from kubedistill.builders.gateway import OFFLINE_ENV, Route, render_config
from kubedistill.local.processes import free_port, read_result, spawn, stop_process
from kubedistill.local.runner import LocalRun

START_TIMEOUT_S = 180.0
DEFAULT_TIMEOUT_S = 120


class ServeError(RuntimeError):
    pass


def find_binary(name: str) -> str:
    """`name` on PATH, else beside this Python (the virtualenv's bin)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise ServeError(
            f"{name} not found on PATH or in {Path(sys.executable).parent}: run scripts/bootstrap.sh"
        )
    return found


def trained_gguf(job_file: Path, workdir: Path, quantization: str | None) -> Path:
    """The GGUF a local run of this job exported (the first quantisation unless one is named)."""
    run = LocalRun(job_file=job_file, workdir=workdir)
    result = read_result(run.base, Stage.EXPORT)
    ggufs = (result.artifacts.gguf_uris or {}) if result is not None and result.ok else {}
    if not ggufs:
        raise ServeError(
            f"no exported GGUF for {run.name} in {run.dir}: run `kubedistill run {job_file} --local` first"
        )
    quant = quantization or next(iter(ggufs))
    if quant not in ggufs:
        raise ServeError(f"no {quant} GGUF; the job exported {', '.join(ggufs)}")
    return Path(ggufs[quant].removeprefix("file://"))


def local_config(alias: str, server_url: str, fallback: str | None, fallback_url: str | None) -> str:
    """The gateway's config for one alias served by one local llama-server (and an optional fallback)."""
    routes = [
        Route(alias, "primary", 100, f"local/{alias}", f"openai/{alias}", server_url, None, DEFAULT_TIMEOUT_S)
    ]
    if fallback:
        routes.append(
            Route(
                alias,
                "fallback",
                0,
                f"local/{alias}/fallback",
                fallback,
                fallback_url,
                None,
                DEFAULT_TIMEOUT_S,
            )
        )
    return render_config(routes, master_key=False)


def _wait_ready(url: str, proc_log: Path, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServeError(f"{what} exited ({proc.returncode}); see {proc_log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ServeError(f"{what} did not become ready in {START_TIMEOUT_S:.0f}s; see {proc_log}")


@dataclass(frozen=True)
class Serving:
    gateway_url: str
    server_url: str
    config_path: Path


@contextmanager
def serve(
    gguf: Path,
    alias: str,
    workdir: Path,
    port: int = 4000,
    fallback: str | None = None,
    fallback_url: str | None = None,
    ctx_size: int = 4096,
) -> Iterator[Serving]:
    """Start llama-server, then the proxy; yield their URLs; stop both (proxy first) on exit."""
    if not gguf.is_file():
        raise ServeError(f"{gguf} does not exist")
    llama, litellm = find_binary("llama-server"), find_binary("litellm")
    logs = workdir / "serve"
    with ExitStack() as stack:
        server_port = free_port()
        server = spawn(
            [llama, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(server_port), "--alias", alias,
             "--metrics", "--ctx-size", str(ctx_size), "--parallel", "2"],
            logs / "llama-server.log",
        )  # fmt: skip
        stack.callback(stop_process, server)
        server_url = f"http://127.0.0.1:{server_port}"
        _wait_ready(f"{server_url}/health", logs / "llama-server.log", "llama-server", server)
        config_path = logs / "config.yaml"
        config_path.write_text(
            local_config(alias, f"{server_url}/v1", fallback, fallback_url), encoding="utf-8"
        )
        proxy = spawn(
            [litellm, "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)],
            logs / "litellm.log",
            env={**os.environ, **OFFLINE_ENV},
        )
        stack.callback(stop_process, proxy)
        gateway = f"http://127.0.0.1:{port}"
        _wait_ready(f"{gateway}/health/readiness", logs / "litellm.log", "the LiteLLM proxy", proxy)
        yield Serving(f"{gateway}/v1", f"{server_url}/v1", config_path)


def curl_command(serving: Serving, alias: str) -> str:
    body = json.dumps({"model": alias, "messages": [{"role": "user", "content": "Hello!"}]})
    return f"curl -s {serving.gateway_url}/chat/completions -H 'Content-Type: application/json' -d '{body}'"
