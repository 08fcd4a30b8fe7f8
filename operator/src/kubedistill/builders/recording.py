"""The recorder in the gateway's manifests: files beside config.yaml, the callback, and its env.

LiteLLM loads `litellm_settings.callbacks: kubedistill_recorder.proxy_handler_instance` from a file
of that name in the config's directory, so the ConfigMap that holds `config.yaml` also holds the
recorder's source and `recording.json` (one rule per routed model name). With no alias recording,
none of this is rendered and the gateway runs without the callback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kubedistill import recorder
from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from kubedistill.domain.recording import OPERATOR_KEY_ENV
from kubedistill.recorder import RECORDING_FILE, Rule

RECORDER_FILE = "kubedistill_recorder.py"
CALLBACK = "kubedistill_recorder.proxy_handler_instance"


def recorder_source() -> str:
    return Path(recorder.__file__).read_text(encoding="utf-8")


def render_recording(rules: Mapping[str, Rule]) -> str:
    """recording.json, sorted so the same rules give the same bytes (and the same config checksum)."""
    doc = {"models": {name: rules[name].to_json() for name in sorted(rules)}}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def config_files(rules: Mapping[str, Rule]) -> dict[str, str]:
    """The ConfigMap entries beside config.yaml."""
    if not rules:
        return {}
    return {RECORDER_FILE: recorder_source(), RECORDING_FILE: render_recording(rules)}


def with_callback(config: str, rules: Mapping[str, Rule]) -> str:
    """A rendered LiteLLM config with the recorder registered, when any alias records."""
    if not rules:
        return config
    doc = yaml.safe_load(config) or {}
    settings = doc.setdefault("litellm_settings", {})
    callbacks = settings.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, str) else list(callbacks)
    settings["callbacks"] = [*callbacks, CALLBACK] if CALLBACK not in callbacks else callbacks
    return yaml.safe_dump(doc, sort_keys=False)


def operator_key_env(storage_secret: str | None, needed: bool) -> list[dict[str, Any]]:
    """The operator's storage keys for rules that record into its bucket, from its Secret by reference."""
    if not needed or not storage_secret:
        return []
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": storage_secret, "key": key}}}
        for env, key in zip(OPERATOR_KEY_ENV, (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV), strict=True)
    ]


def add_to_gateway(
    config_map: dict[str, Any],
    deployment: dict[str, Any],
    files: Mapping[str, str],
    env: list[dict[str, Any]],
) -> None:
    """The recorder's files into the gateway's ConfigMap (mounted as the config's directory) and the
    operator's storage keys into its container's env."""
    config_map.setdefault("data", {}).update(files)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [*container.get("env", []), *env]
