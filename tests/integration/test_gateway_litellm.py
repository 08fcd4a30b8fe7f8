"""The gateway config the operator renders, read by the real LiteLLM proxy (PyPI, the pinned version).

Three loopback OpenAI-compatible servers stand in for the model servers and the provider: the proxy
splits `model=smart` by the canary weight, names the answering deployment (x-litellm-model-id = our
deploymentId), passes the provider key it reads from `os.environ/…`, refuses a request without the master key, and
falls back when the primary and canary are gone.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from kubedistill.builders import gateway as gw
from kubedistill.errors import DistillerError
from kubedistill.local.processes import free_port, spawn, stop_process
from kubedistill.sdk.chat import chat
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.servers import build_litellm

MASTER = "sk-master-test"


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"LiteLLM not ready: {log.read_text()[-3000:]}")


def test_litellm_routes_weights_keys_and_fallback(tmp_path: Path) -> None:
    litellm = build_litellm()
    primary = FakeTeacher(answers=lambda *_: "primary", models=("smart",)).start()
    canary = FakeTeacher(answers=lambda *_: "canary", models=("smart",)).start()
    provider = FakeTeacher(
        answers=lambda *_: "teacher", models=("teacher-model",), api_key="sk-provider"
    ).start()
    routes = [
        gw.Route("smart", "primary", 80, "ns/smart-p", "openai/smart", primary.base_url, None, 30),
        gw.Route("smart", "canary", 20, "ns/smart-c", "openai/smart", canary.base_url, None, 30),
        gw.Route(
            "smart",
            "fallback",
            0,
            "ns/smart/fb",
            "openai/teacher-model",
            provider.base_url,
            "KD_PROVIDER_KEY_T",
            30,
        ),
    ]
    config = tmp_path / "config.yaml"
    config.write_text(gw.render_config(routes, master_key=True))
    port, log = free_port(), tmp_path / "litellm.log"
    env = {**os.environ, **gw.OFFLINE_ENV, "LITELLM_MASTER_KEY": MASTER, "KD_PROVIDER_KEY_T": "sk-provider"}
    proxy = spawn(
        [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)], log, env
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health/readiness", proxy, log)
        answered = Counter()
        for _ in range(200):
            reply = chat(url, "smart", "hi", api_key=MASTER)
            answered[(reply.deployment_id, reply.text)] += 1
        assert set(answered) == {("ns/smart-p", "primary"), ("ns/smart-c", "canary")}
        assert 0.1 <= answered[("ns/smart-c", "canary")] / 200 <= 0.3, answered

        # Refused (LiteLLM without a database answers 400 "No connected db" for a key it cannot look up).
        with pytest.raises(DistillerError, match=r"HTTP 4\d\d"):
            chat(url, "smart", "hi", api_key="sk-wrong")
        with pytest.raises(DistillerError, match=r"HTTP [45]\d\d"):  # no key: LiteLLM 1.106 answers 500
            chat(url, "smart", "hi")

        primary.stop()
        canary.stop()
        reply = chat(url, "smart", "hi", api_key=MASTER)
        assert reply.text == "teacher"  # the provider took it, with the key from the environment
    finally:
        stop_process(proxy, grace=(5.0, 5.0))
        for server in (primary, canary, provider):
            server.stop()
