"""The serving tests' fixtures: the real S3 server holding the tiny Llama's GGUF, the fake teacher, and
the operator with its gateway on, serving `smart` → the teacher."""

from __future__ import annotations

import json
import secrets
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kubedistill import store
from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.s3 import RcloneS3
from kubedistill_testing.tiny_gguf import tiny_gguf
from serve_support import ALIAS, FAKE_IMAGE, TEACHER_MODEL, Serving, serve_operator


@pytest.fixture
def serving_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        server.create_bucket("artifacts")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)  # this process writes the GGUF
        yield server


@pytest.fixture
def serving_teacher() -> Iterator[FakeTeacher]:
    with FakeTeacher({}, models=(TEACHER_MODEL,)) as running:
        yield running


@pytest.fixture
def serving(
    control_plane: Path,
    kubelet: LocalKubelet,
    serving_images: None,
    namespace: str,
    k8s_api: client.ApiClient,
    serving_s3: RcloneS3,
    serving_teacher: FakeTeacher,
    tmp_path: Path,
) -> Iterator[Serving]:
    """The operator with its gateway, S3 holding the tiny Llama's GGUF, and `smart` → the teacher."""
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {
                S3_ACCESS_KEY_ENV: serving_s3.access_key,
                S3_SECRET_KEY_ENV: serving_s3.secret_key,
            },
        },
    )
    master_key = "sk-" + secrets.token_urlsafe(18)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "gateway-master"}, "stringData": {"master-key": master_key}}
    )
    gguf_uri = f"s3://artifacts/models/{uuid.uuid4().hex[:8]}/tiny-llama-q8_0.gguf"
    store.put_file(tiny_gguf(), gguf_uri)
    kubelet.images[FAKE_IMAGE] = [sys.executable, "-m", "kubedistill_testing.fake_stage"]
    operator = serve_operator(
        control_plane,
        namespace,
        tmp_path,
        {
            **serving_s3.env(),
            "KUBEDISTILL_TRAINER_IMAGE": f"{FAKE_IMAGE}:1",
            "KUBEDISTILL_STORAGE_BUCKET": "artifacts",
            "KUBEDISTILL_STORAGE_ENDPOINT": serving_s3.env()["KUBEDISTILL_S3_ENDPOINT"],
            "KUBEDISTILL_STORAGE_SECRET": "s3-credentials",
            "KUBEDISTILL_GATEWAY_MASTER_KEY_SECRET": "gateway-master",
            # The fake export copies the real GGUF where the job says its student is.
            "KUBEDISTILL_STAGE_ENV": json.dumps({"KUBEDISTILL_FAKE_GGUF": gguf_uri}),
        },
    ).start()
    running = Serving(
        namespace,
        core,
        client.AppsV1Api(k8s_api),
        client.CustomObjectsApi(k8s_api),
        operator,
        kubelet,
        serving_teacher,
        gguf_uri,
        master_key,
    )
    try:
        running.create_alias(ALIAS, {"target": running.provider()})  # day one: the teacher serves `smart`
        yield running
    finally:
        operator.stop()
