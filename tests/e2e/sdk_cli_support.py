"""What the end-to-end tests share: a small DistillationJob, and an operator process on the test control
plane whose stage pods run the contract-honouring fake stage (`kubedistill_testing.fake_stage`) in the
local kubelet."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.operator_process import OperatorProcess

FAKE_IMAGE = "kubedistill.test/fake-stage"
ROWS = [
    {"id": "t1", "prompt": "I was charged twice this month.", "reference": "billing"},
    {"id": "t2", "prompt": "The app crashes when I open settings.", "reference": "bug"},
    {"id": "t3", "prompt": "Where is my parcel?", "reference": "shipping"},
]


def job_body(name: str, **spec: Any) -> dict[str, Any]:
    """A DistillationJob small enough for fake stages; `spec` keys replace the defaults whole."""
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "teacher": {"model": "openai/gpt-4o-mini"},
            "student": {"model": "qwen3-0.6b"},
            "dataset": {"prompts": ["What is 2+2?", "Name a colour.", "Say hi."]},
            "generation": {"nSamples": 2},
            "curation": {"judge": {"majority": {}}, "topK": 1},
            "training": {"steps": 2},
            **spec,
        },
    }


@contextmanager
def operator_process(
    kubeconfig: Path, namespace: str, workdir: Path, kubelet: LocalKubelet, **stage_env: str
) -> Iterator[OperatorProcess]:
    """`python -m kubedistill.handlers -n NS` with the fake stage as its trainer image; stopped afterwards."""
    kubelet.images[FAKE_IMAGE] = [sys.executable, "-m", "kubedistill_testing.fake_stage"]
    env = {
        "KUBEDISTILL_TRAINER_IMAGE": f"{FAKE_IMAGE}:1",
        "KUBEDISTILL_ARTIFACT_ROOT": (workdir / "artifacts").as_uri(),
    }
    if stage_env:
        env["KUBEDISTILL_STAGE_ENV"] = json.dumps(stage_env)
    running = OperatorProcess(kubeconfig, namespace, workdir, env).start()
    try:
        yield running
    finally:
        running.stop()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
