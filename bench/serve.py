"""Benchmark: requests/s and p50/p95 latency through the gateway (LiteLLM proxy) vs straight to llama-server.

One llama-server (llama.cpp's own, built once per machine by kubedistill_testing.servers) serves the tiny
test Llama's GGUF on loopback; one LiteLLM proxy routes `model=smart` to it with the config the operator
renders (kubedistill.builders.gateway.render_config). The same chat requests (a fixed prompt set, greedy,
`--max-tokens` each) go to each side from `--concurrency` client threads with keep-alive connections, in
alternating rounds so that a change in the machine's load hits both sides alike.

    python bench/serve.py [--requests 200] [--concurrency 4] [--max-tokens 8] [--rounds 2]

Ends with one JSON line (bench/_common.py) holding `gateway_overhead_p50_ms` (gateway p50 − direct p50)
and `ratio` (gateway requests/s ÷ direct requests/s; goal ≥ 0.8).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from _common import child_pythonpath, finish, machine_banner, ratio
from kubedistill.builders.gateway import OFFLINE_ENV, Route, render_config
from kubedistill.local.processes import free_port, spawn, stop_process
from kubedistill_testing import servers
from kubedistill_testing.tiny_gguf import tiny_gguf

ALIAS = "smart"
PROMPTS = [
    "Where is my parcel?",
    "I was charged twice this month.",
    "The app crashes when I open settings.",
    "I cannot log in to my account.",
    "How do I change my address?",
    "Can I get a refund?",
    "What is the capital of France?",
    "Write one word about the sea.",
]
START_TIMEOUT_S = 300.0


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"{url} not ready in {START_TIMEOUT_S:.0f}s: {log.read_text(errors='replace')[-2000:]}"
    )


@contextlib.contextmanager
def llama_server(gguf: Path, workdir: Path, parallel: int) -> Iterator[int]:
    port = free_port()
    argv = [
        str(servers.build_llama_server()), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--alias", ALIAS, "--ctx-size", str(512 * parallel), "--parallel", str(parallel),
        "--threads", str(os.cpu_count() or 2),
    ]  # fmt: skip
    log = workdir / "llama-server.log"
    proc = spawn(argv, log)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health", proc, log)
        yield port
    finally:
        stop_process(proc, (5.0, 5.0))


@contextlib.contextmanager
def gateway(backend_port: int, workdir: Path) -> Iterator[int]:
    route = Route(
        model_name=ALIAS,
        role="primary",
        weight=100,
        deployment_id="bench/smart",
        model=f"openai/{ALIAS}",
        api_base=f"http://127.0.0.1:{backend_port}/v1",
        api_key_env=None,
        timeout_seconds=120,
    )
    config = workdir / "config.yaml"
    config.write_text(render_config([route], master_key=False))
    port = free_port()
    log = workdir / "litellm.log"
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": child_pythonpath()}
    argv = [str(servers.build_litellm()), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(argv, log, env)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health/readiness", proc, log)
        yield port
    finally:
        stop_process(proc, (5.0, 5.0))


def run_load(port: int, requests: int, concurrency: int, max_tokens: int) -> tuple[float, list[float]]:
    """(requests/s, latencies in ms) of `requests` chat requests from `concurrency` keep-alive clients."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for n in counter:
            body = json.dumps({
                "model": ALIAS, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
            })  # fmt: skip
            started = time.perf_counter()
            connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read()
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                latencies.append(elapsed)
                if response.status != 200:
                    failures.append(text.decode(errors="replace")[:300])
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed, e.g. {failures[0]}")
    return requests / wall, latencies


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="per side per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    machine = machine_banner()
    gguf = tiny_gguf()
    results: dict[str, tuple[float, list[float]]] = {"direct": (0.0, []), "gateway": (0.0, [])}
    with (
        tempfile.TemporaryDirectory() as tmp,
        llama_server(gguf, Path(tmp), args.concurrency) as direct_port,
        gateway(direct_port, Path(tmp)) as gateway_port,
    ):
        ports = {"direct": direct_port, "gateway": gateway_port}
        for port in ports.values():  # warm-up: connections, the first request's lazy imports
            run_load(port, args.concurrency * 4, args.concurrency, args.max_tokens)
        wall = {"direct": 0.0, "gateway": 0.0}
        for _ in range(args.rounds):
            for side, port in ports.items():
                rate, latencies = run_load(port, args.requests, args.concurrency, args.max_tokens)
                wall[side] += args.requests / rate
                results[side][1].extend(latencies)
        rates = {side: args.requests * args.rounds / wall[side] for side in ports}

    direct, via = results["direct"][1], results["gateway"][1]
    figures = {
        "direct_requests_per_s": round(rates["direct"], 2),
        "gateway_requests_per_s": round(rates["gateway"], 2),
        "direct_p50_ms": round(statistics.median(direct), 2),
        "direct_p95_ms": round(percentile(direct, 95), 2),
        "gateway_p50_ms": round(statistics.median(via), 2),
        "gateway_p95_ms": round(percentile(via, 95), 2),
    }
    overhead = figures["gateway_p50_ms"] - figures["direct_p50_ms"]
    throughput = rates["gateway"] / rates["direct"]
    print(
        f"direct: {figures['direct_requests_per_s']} req/s, p50 {figures['direct_p50_ms']} ms, "
        f"p95 {figures['direct_p95_ms']} ms; gateway: {figures['gateway_requests_per_s']} req/s, "
        f"p50 {figures['gateway_p50_ms']} ms, p95 {figures['gateway_p95_ms']} ms"
    )
    finish(
        "serve",
        [ratio("gateway requests/s / direct llama-server requests/s", throughput, ">= 0.8")],
        machine,
        **figures,
        gateway_overhead_p50_ms=round(overhead, 2),
        ratio=round(throughput, 3),
        requests=args.requests * args.rounds,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
    )


if __name__ == "__main__":
    main()
