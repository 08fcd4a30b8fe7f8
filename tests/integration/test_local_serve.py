"""`kubedistill serve` (local mode): the real llama-server for a GGUF and the real LiteLLM proxy on loopback,
the proxy with the gateway's own config: `model=smart` answers through the proxy, from the llama-server
(LiteLLM's x-litellm-model-id names the deployment that answered), only with the run's master key; a job
without a trained GGUF is told what to run first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kubedistill.errors import DistillerError
from kubedistill.local.processes import free_port
from kubedistill.local.serve import ServeError, curl_command, local_config, serve, trained_gguf
from kubedistill.sdk.chat import chat
from kubedistill_testing.servers import build_litellm, build_llama_server
from kubedistill_testing.tiny_gguf import tiny_gguf

REPO = Path(__file__).resolve().parents[2]


def test_local_config_is_the_gateway_config() -> None:
    config = yaml.safe_load(local_config("smart", "http://127.0.0.1:9/v1", "openai/gpt-4o", "http://t/v1"))
    assert [(e["model_name"], e["model_info"]["id"]) for e in config["model_list"]] == [
        ("smart", "local/smart"),
        ("smart:fallback", "local/smart/fallback"),
    ]
    assert config["router_settings"]["fallbacks"] == [{"smart": ["smart:fallback"]}]


def test_no_trained_gguf_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(ServeError, match=r"kubedistill run .* --local"):
        trained_gguf(REPO / "examples" / "quickstart" / "job.yaml", tmp_path, None)


def test_serve_answers_model_smart_through_the_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    llama, litellm = build_llama_server(), build_litellm()
    monkeypatch.setenv("PATH", os.pathsep.join([str(llama.parent), str(litellm.parent), os.environ["PATH"]]))
    with serve(tiny_gguf(), "smart", tmp_path, port=free_port(), ctx_size=512) as serving:
        reply = chat(serving.gateway_url, "smart", "Hello", api_key=serving.master_key)
        assert reply.deployment_id == "local/smart" and isinstance(reply.text, str)
        with pytest.raises(DistillerError, match=r"HTTP 4\d\d"):
            chat(serving.gateway_url, "smart", "Hello", api_key="sk-not-the-key")
        assert f"Bearer {serving.master_key}" in curl_command(serving, "smart")
    assert (tmp_path / "serve" / "config.yaml").is_file()
