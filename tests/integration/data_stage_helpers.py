"""Helpers for the generate / curate tests: invocations, stage processes, a priced catalog, secret checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubedistill import store

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-kd-test-5f1c2a9e7b3d4c6e8f0a1b2c"
PRICE_IN, PRICE_OUT = 3.0, 15.0  # USD per million tokens of the test teacher "acme/teacher-1"


def priced_catalog(directory: Path, base_url: str) -> Path:
    """A catalog override adding provider acme (at `base_url`) with one priced model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "teachers.yaml").write_text(
        f"providers:\n  acme: {{baseURL: '{base_url}', supportsN: true, charsPerToken: 4.0}}\n"
        f"teachers:\n  - {{id: acme/teacher-1, inputPerMTok: {PRICE_IN}, outputPerMTok: {PRICE_OUT},"
        " priceDate: '2026-11-01'}\n"
    )
    return directory


def spec(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "teacher": {"model": "acme/teacher-1", "maxConcurrency": 8, "timeoutSeconds": 5},
        "student": {"model": "smollm2-135m"},
        "dataset": {"prompts": ["unused"]},
        "generation": {"nSamples": 2, "maxTokens": 32},
        "curation": {"judge": {"majority": {}}, "topK": 1},
    }
    for key, value in sections.items():
        # The dataset's sources exclude one another: a dataset section replaces the default.
        merge = isinstance(value, dict) and key != "dataset"
        doc[key] = {**doc.get(key, {}), **value} if merge else value
    return doc


def invocation(base: str, job_spec: dict[str, Any], stage: str = "generate") -> dict[str, Any]:
    return {
        "job": {"name": "job", "namespace": "team", "uid": "uid-1"},
        "spec": job_spec,
        "stage": stage,
        "artifactBase": base,
    }


def stage_env(tmp_path: Path, inv: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "operator" / "src"), str(REPO / "trainer-image" / "src"), env.get("PYTHONPATH", "")]
    )
    env["KUBEDISTILL_JOB"] = json.dumps(inv)
    env["KUBEDISTILL_TERMINATION_LOG"] = str(tmp_path / f"termination-{inv['stage']}.log")
    env.update(extra or {})
    return env


def start_stage(
    tmp_path: Path, inv: dict[str, Any], extra: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubedistill_trainer", inv["stage"]],
        env=stage_env(tmp_path, inv, extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class StageRun:
    returncode: int
    stdout: str
    stderr: str
    termination: dict[str, Any] | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_stage(
    tmp_path: Path, inv: dict[str, Any], extra: dict[str, str] | None = None, timeout: float = 120
) -> StageRun:
    proc = start_stage(tmp_path, inv, extra)
    stdout, stderr = proc.communicate(timeout=timeout)
    log = tmp_path / f"termination-{inv['stage']}.log"
    termination = json.loads(log.read_text()) if log.exists() else None
    return StageRun(proc.returncode, stdout, stderr, termination)


def result(inv: dict[str, Any]) -> dict[str, Any]:
    return dict(store.read_json(f"{inv['artifactBase']}/{inv['stage']}/result.json"))


def shard_rows(inv: dict[str, Any]) -> list[dict[str, Any]]:
    uris = store.list_uris(f"{inv['artifactBase']}/generate/candidates/")
    return [row for uri in uris for row in store.read_jsonl(uri)]


def assert_secret_absent(secret: str, texts: list[str], base: str) -> None:
    """`secret` appears in none of `texts` nor in any artifact below `base`."""
    for text in texts:
        assert secret not in text
    for uri in store.list_uris(base.rstrip("/") + "/"):
        assert secret.encode() not in store.read_bytes(uri), uri
