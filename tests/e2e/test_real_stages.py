"""The cluster path with the real stage programs: the operator on the test control plane creates the stage
Jobs, the local kubelet runs their pods as `python -m kubedistill_trainer STAGE` (its image → command map
names the trainer image), and the pods get the environment the trainer image's Dockerfile `ENV` lines
give, not this shell's: a stage that needs a variable the image does not set fails here as it would on a
cluster.

Credentials travel as they do in a cluster: the S3 keys (a real S3 server, rclone) and the teacher's key
(a loopback teacher that answers 401 without it) are Secrets, which the pods receive through
`secretKeyRef`. The job runs generate → curate → train → export → evaluate on the tiny random Llama
(downloaded by the stages from S3), is promoted, and its ModelAlias resolves to a q4_k_m GGUF in S3
that llama.cpp loads and generates from. No secret value may appear in the status, the events, or any
pod's or the operator's log.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from kubernetes import client
from sdk_cli_support import wait_until

from kubedistill import store
from kubedistill.api.models import GROUP, STAGES, VERSION
from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.image_env import dockerfile_env, dockerfile_workdir, image_environment
from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.s3 import RcloneS3
from kubedistill_trainer.export import converter_dir

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TRAINER_IMAGE = "ghcr.io/kubedistill/trainer"
# Every stage starts a Python with torch on a shared machine: minutes, not seconds.
WAIT_S = 480.0
LABELS = ("billing", "bug", "account", "shipping")
ROWS = [
    {"id": f"t{i:02d}", "prompt": f"Ticket {i}: {text}", "reference": label}
    for i, (text, label) in enumerate(
        [
            ("I was charged twice this month.", "billing"),
            ("The app crashes when I open settings.", "bug"),
            ("I cannot log in to my account.", "account"),
            ("Where is my parcel?", "shipping"),
        ]
        * 4
    )
]


def trainer_image_env() -> dict[str, str]:
    """The trainer image's ENV lines, with the image's paths as this machine has them. Its /tmp stays as
    written: that is each stage Pod's emptyDir, where the kubelet points paths under it."""
    return dockerfile_env(
        (ROOT / "trainer-image" / "Dockerfile").read_text(),
        base={"PATH": os.environ["PATH"]},  # the base image's PATH
        filesystem={
            "/opt/venv": sys.prefix,  # the image's virtualenv: this interpreter's
            # llama.cpp's converter from the llama-cpp-python sdist, where the bootstrap keeps it
            "/opt/llama.cpp": converter_dir(dict(os.environ)),
        },
    )


@pytest.fixture
def s3() -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        server.create_bucket("artifacts")
        yield server


@pytest.fixture
def s3_env(s3: RcloneS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process (the test, and the operator it starts) talks to S3 with the server's keys."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3.env()


def start_operator(
    kubeconfig: Path, namespace: str, workdir: Path, s3_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **s3_env,
        "KUBECONFIG": str(kubeconfig),
        "KUBEDISTILL_TRAINER_IMAGE": f"{TRAINER_IMAGE}:e2e",
        "KUBEDISTILL_IMAGE_PULL_POLICY": "Never",
        "KUBEDISTILL_STORAGE_BUCKET": "artifacts",
        "KUBEDISTILL_STORAGE_ENDPOINT": s3_env["KUBEDISTILL_S3_ENDPOINT"],
        "KUBEDISTILL_STORAGE_SECRET": "s3-credentials",
        "KUBEDISTILL_DEFAULT_TRAIN_GPUS": "0",
        "KUBEDISTILL_RETRY_BACKOFF_BASE_S": "0.5",
        "KUBEDISTILL_PROGRESS_INTERVAL_S": "2",
    }
    with (workdir / "operator.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubedistill.handlers", "-n", namespace],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_operator_runs_the_real_stages_with_the_images_env_and_secrets(
    control_plane: Path,
    kubelet: LocalKubelet,
    namespace: str,
    k8s_api: client.ApiClient,
    s3: RcloneS3,
    s3_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    teacher_key = "sk-e2e-" + secrets.token_urlsafe(18)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {S3_ACCESS_KEY_ENV: s3.access_key, S3_SECRET_KEY_ENV: s3.secret_key},
        },
    )
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "teacher"}, "stringData": {"api-key": teacher_key}}
    )
    run = uuid.uuid4().hex[:8]
    student = f"s3://artifacts/models/{run}/tiny-llama"
    store.put_tree(tiny_llama(), student)
    dataset = f"s3://artifacts/datasets/{run}/tickets.jsonl"
    store.write_jsonl(dataset, ROWS)
    answers = {row["prompt"]: row["reference"] for row in ROWS}
    kubelet.images[TRAINER_IMAGE] = [sys.executable, "-m", "kubedistill_trainer"]
    # The stage Pods start where the image's containers do (its WORKDIR, in their emptyDir /tmp).
    dockerfile = (ROOT / "trainer-image" / "Dockerfile").read_text()
    monkeypatch.setitem(kubelet.workdirs, TRAINER_IMAGE, dockerfile_workdir(dockerfile))
    name = "real-stages"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "teacher": {
                "model": "fake-teacher",
                "apiKeySecretRef": {"name": "teacher", "key": "api-key"},
            },
            "student": {"model": student},
            "dataset": {"uri": dataset, "testFraction": 0.25},
            # The smoke preset's sizes: every stage does real work, none for long.
            "generation": {"nSamples": 2, "maxTokens": 8},
            "curation": {"judge": {"reference": {}}, "topK": 1},
            "training": {"steps": 4, "batchSize": 4, "checkpointEvery": 2, "maxSeqLength": 128},
            "export": {"gguf": True, "quantizations": ["q4_k_m"]},
            "promotion": {"alias": "smart", "minEvalScore": 0.0},
        },
    }
    with (
        FakeTeacher(answers, api_key=teacher_key, models=("fake-teacher",)) as teacher,
        image_environment(kubelet, trainer_image_env()),
    ):
        body["spec"]["teacher"]["baseURL"] = teacher.base_url  # type: ignore[index]
        operator = start_operator(control_plane, namespace, tmp_path, s3_env)
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "distillationjobs", body)

            done = wait_for_success(custom, kubelet, operator, namespace, name, tmp_path, WAIT_S)

            def alias_ready() -> dict[str, Any] | None:
                alias = custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "modelaliases", "smart"
                )
                ready = [
                    c for c in (alias.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"
                ]
                return alias if ready and ready[0]["status"] == "True" else None

            alias = wait_until(alias_ready, "the alias to resolve", 60)
        finally:
            operator.terminate()
            operator.wait(timeout=30)
        unauthorized = [c for c in teacher.calls if c.status == 401]
        answered = teacher.ok_calls()

    status = done["status"]
    shown = json.dumps(status, indent=1)
    assert [s["state"] for s in status["stages"]] == ["Succeeded"] * len(STAGES), shown
    assert [s["attempts"] for s in status["stages"]] == [1] * len(STAGES)
    # The teacher was called with the key from the Secret, and only with it.
    assert answered and not unauthorized
    assert status["metrics"]["teacherCalls"] == len(answered)
    assert (
        status["metrics"].get("evalScore") is not None and status["metrics"].get("retention") is not None
    ), shown
    # Speed per request, taken apart: latency of the teacher's calls; llama.cpp's own rates for the student.
    metrics = status["metrics"]
    assert 0 < metrics["teacherLatencyP50Sec"] <= metrics["teacherLatencyP95Sec"], shown
    assert 0 < metrics["studentLatencyP50Sec"] <= metrics["studentLatencyP95Sec"], shown
    assert metrics["studentPromptTokensPerSecond"] > 0 and metrics["studentDecodeTokensPerSecond"] > 0, shown
    gguf = status["artifacts"]["ggufURIs"]["q4_k_m"]
    assert gguf.startswith(f"s3://artifacts/kubedistill/{namespace}/{name}/")
    assert alias["status"]["ggufURI"] == gguf

    local = tmp_path / "student.gguf"
    store.get_file(alias["status"]["ggufURI"], local)
    llm = llama_cpp.Llama(model_path=str(local), n_ctx=128, n_threads=1, verbose=False)
    try:
        out: Any = llm.create_completion("Ticket 1:", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()

    logs = [(tmp_path / "operator.log").read_text(errors="replace")]
    logs += [p.read_text(errors="replace") for p in (kubelet.root / "logs" / namespace).rglob("*.log")]
    assert len(logs) > len(STAGES)  # the operator's and at least one per stage pod
    events = [e.message or "" for e in core.list_namespaced_event(namespace).items]
    for secret in (teacher_key, s3.secret_key, s3.access_key):
        assert secret not in json.dumps(done), "a secret in the job's status"
        assert secret not in json.dumps(alias), "a secret in the alias"
        assert not [m for m in events if secret in m], "a secret in an event"
        assert not [text for text in logs if secret in text], "a secret in a log"


def diagnose(
    custom: client.CustomObjectsApi, kubelet: LocalKubelet, namespace: str, name: str, workdir: Path
) -> str:
    """The job's status and the tail of every log: what a failure here needs to be understood."""
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distillationjobs", name)
    parts = [json.dumps(obj.get("status"), indent=1)]
    for path in sorted((kubelet.root / "logs" / namespace).rglob("*.log")):
        parts.append(f"--- {path.parent.name}\n{path.read_text(errors='replace')[-2500:]}")
    parts.append(f"--- operator\n{(workdir / 'operator.log').read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


def wait_for_success(
    custom: client.CustomObjectsApi,
    kubelet: LocalKubelet,
    operator: subprocess.Popen[bytes],
    namespace: str,
    name: str,
    tmp_path: Path,
    timeout: float,
) -> dict[str, Any]:
    """The job once it has finished, asserting it Succeeded (with a diagnosis if not), the operator alive."""

    def finished() -> dict[str, Any] | None:
        assert operator.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "distillationjobs", name)
        return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

    try:
        done: dict[str, Any] = wait_until(finished, "the job to finish", timeout)
    except AssertionError:
        raise AssertionError(diagnose(custom, kubelet, namespace, name, tmp_path)) from None
    assert done["status"]["phase"] == "Succeeded", diagnose(custom, kubelet, namespace, name, tmp_path)
    return done
