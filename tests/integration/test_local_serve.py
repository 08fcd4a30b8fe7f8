"""`kubedistill serve` (local mode): the proxy gets the gateway's own config for the one local server, and
a job without a trained GGUF is told what to run first."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubedistill.local.serve import ServeError, local_config, trained_gguf

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
