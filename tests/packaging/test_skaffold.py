"""skaffold.yaml against skaffold's own JSON schema for its apiVersion.

The schema comes from the skaffold Go module (docs-v2/content/en/schemas/<version>.json), fetched once
through the Go module proxy with `go mod download` and cached under ~/.cache/kubedistill/.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubedistill_testing.cache import cache_root

ROOT = Path(__file__).resolve().parents[2]
SKAFFOLD_MODULE = "github.com/GoogleContainerTools/skaffold/v2"
# v2.16.1 is the newest release of the module the proxy serves here; its newest schema is v4beta13.
SKAFFOLD_VERSION = "v2.16.1"


def skaffold_schema(api_version: str) -> dict[str, Any]:
    version = api_version.removeprefix("skaffold/")
    cached = cache_root() / "skaffold-schemas" / SKAFFOLD_VERSION / f"{version}.json"
    if not cached.is_file():
        go = shutil.which("go") or "/usr/local/go/bin/go"
        cache_root().mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [go, "mod", "download", "-json", f"{SKAFFOLD_MODULE}@{SKAFFOLD_VERSION}"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=cache_root(),
            env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
        )
        info = json.loads(result.stdout or "{}")
        assert "Dir" in info, (
            f"go mod download {SKAFFOLD_MODULE}@{SKAFFOLD_VERSION} failed: {info or result.stderr}"
        )
        source = Path(info["Dir"]) / "docs-v2" / "content" / "en" / "schemas" / f"{version}.json"
        assert source.is_file(), f"skaffold {SKAFFOLD_VERSION} has no schema for {api_version}"
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(cached)
    schema: dict[str, Any] = json.loads(cached.read_text())
    return schema


def errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(skaffold_schema(config["apiVersion"]))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


def json_patch_add(doc: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply the `add` operations of a profile (the only kind skaffold.yaml uses)."""
    out = copy.deepcopy(doc)
    for patch in patches:
        assert patch["op"] == "add", patch
        *parents, last = patch["path"].strip("/").split("/")
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = patch["value"]
    return out


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    return loaded


def test_skaffold_yaml_matches_the_schema_of_its_api_version(config: dict[str, Any]) -> None:
    assert config["apiVersion"] == "skaffold/v4beta13"
    assert errors(config) == []


def test_the_dev_profile_is_valid_and_enables_minio(config: dict[str, Any]) -> None:
    (dev,) = [p for p in config["profiles"] if p["name"] == "dev"]
    patched = json_patch_add(config, dev["patches"])
    assert errors(patched) == []
    assert patched["deploy"]["helm"]["releases"][0]["setValues"]["minio.enabled"] is True


def test_the_schema_rejects_what_skaffold_would(config: dict[str, Any]) -> None:
    typo = copy.deepcopy(config)
    typo["deploy"]["helm"]["releases"][0]["chartPth"] = "charts/kubedistill"
    assert any("chartPth" in e for e in errors(typo))
    wrong_type = copy.deepcopy(config)
    wrong_type["build"]["artifacts"][0]["docker"]["dockerfile"] = ["operator/Dockerfile"]
    assert errors(wrong_type)


def test_artifacts_and_values_match_the_chart_and_dockerfiles(config: dict[str, Any]) -> None:
    values = yaml.safe_load((ROOT / "charts" / "kubedistill" / "values.yaml").read_text())
    artifacts = {a["image"]: a for a in config["build"]["artifacts"]}
    assert set(artifacts) == {values["image"]["repository"], values["trainer"]["image"]["repository"]}
    for artifact in artifacts.values():
        assert (ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()
    (release,) = config["deploy"]["helm"]["releases"]
    assert (ROOT / release["chartPath"] / "Chart.yaml").is_file()
    templates = release["setValueTemplates"]
    assert templates["trainer.image.repository"] == "{{.IMAGE_REPO_ghcr_io_kubedistill_trainer}}"
    (dev,) = [p for p in config["profiles"] if p["name"] == "dev"]
    for key in [*templates, *dev["patches"][0]["value"]]:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not a value of the chart"
            node = node[part]
