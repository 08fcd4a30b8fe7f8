"""The model server of one served GGUF: a Deployment running llama.cpp's `llama-server` and its Service.

The name carries a version, a hash of everything that makes the server different (the GGUF, the
server settings, the image), so a re-point creates a new Deployment beside the old one instead of
restarting it: requests in flight on the old server finish while the gateway moves to the new one
(llama.cpp #21678: swapping a model inside a running server aborts them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kubedistill.api.alias import ModelAlias, ServerSpec
from kubedistill.api.models import API_VERSION, GROUP
from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_ENDPOINT_ENV, S3_SECRET_KEY_ENV
from kubedistill.domain.naming import LABEL_MANAGED_BY, MANAGED_BY, fit, label_value
from kubedistill.settings import Settings

LABEL_ALIAS = f"{GROUP}/alias"
LABEL_VERSION = f"{GROUP}/model-version"
PORT = 8080
MODEL_DIR = "/models"
MODEL_PATH = f"{MODEL_DIR}/model.gguf"
FETCH_CONTAINER = "fetch"
SERVER_CONTAINER = "server"
# The server keeps answering this long after it is taken out of its Service, so that a request the
# gateway sent just before the endpoints changed still lands; then the grace period covers the longest request.
DRAIN_SECONDS = 5
_VERSION_LEN = 8


@dataclass(frozen=True)
class GgufSource:
    """Where a served GGUF lives, and the storage settings (never the secret values) to read it with."""

    uri: str
    s3_endpoint: str | None = None
    credentials_secret: str | None = None


def server_version(source: GgufSource, server: ServerSpec, image: str) -> str:
    """A short stable hash of the artifact and every setting the server runs with."""
    payload = json.dumps(
        {"uri": source.uri, "server": server.to_k8s(), "image": image, "endpoint": source.s3_endpoint},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:_VERSION_LEN]


def server_name(alias: str, version: str) -> str:
    """`<alias>-<version>`, the alias shortened (with a hash) so the whole fits a DNS-1035 label."""
    return f"{fit(alias, 63 - _VERSION_LEN - 1)}-{version}"


def server_labels(alias: str, version: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_ALIAS: label_value(alias), LABEL_VERSION: version}


def alias_owner_reference(alias: ModelAlias) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelAlias",
        "name": alias.metadata.name,
        "uid": alias.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def service_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{PORT}/v1"


def _fetch_env(source: GgufSource) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if source.s3_endpoint:
        env.append({"name": S3_ENDPOINT_ENV, "value": source.s3_endpoint})
    if source.credentials_secret:
        for key in (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV):
            env.append(
                {"name": key, "valueFrom": {"secretKeyRef": {"name": source.credentials_secret, "key": key}}}
            )
    return env


_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
}


def build_model_server(alias: ModelAlias, source: GgufSource, settings: Settings) -> list[dict[str, Any]]:
    """[Deployment, Service] serving `source` as `model=<alias>`, owned by the alias."""
    spec = alias.spec.server
    image = spec.image or settings.server_image
    version = server_version(source, spec, image)
    name = server_name(alias.metadata.name, version)
    namespace = alias.metadata.namespace or "default"
    labels = server_labels(alias.metadata.name, version)
    meta = {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [alias_owner_reference(alias)],
    }
    probe = {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 2, "timeoutSeconds": 2}
    mounts = [{"name": "models", "mountPath": MODEL_DIR}]
    fetch = {
        "name": FETCH_CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["fetch", "--uri", source.uri, "--out", MODEL_PATH],
        "env": _fetch_env(source),
        "volumeMounts": [*mounts, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {**_SECURITY, "readOnlyRootFilesystem": True},
    }
    server = {
        "name": SERVER_CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        # No command: the upstream image's ENTRYPOINT is llama-server itself.
        "args": [
            "--model",
            MODEL_PATH,
            "--host",
            "$(POD_IP)",
            "--port",
            str(PORT),
            "--alias",
            alias.metadata.name,
            "--metrics",
            "--ctx-size",
            str(spec.ctx_size),
            "--parallel",
            str(spec.parallel),
        ],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": (spec.resources or settings.server_resources).to_k8s(),
        "volumeMounts": mounts,
        # Loading a GGUF takes a while; /health answers 503 until the model is in memory.
        "startupProbe": {**probe, "failureThreshold": 300},
        "readinessProbe": {**probe, "failureThreshold": 2},
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _SECURITY,
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": spec.request_timeout_seconds + DRAIN_SECONDS + 5,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
        "initContainers": [fetch],
        "containers": [server],
        "volumes": [{"name": "models", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = list(spec.tolerations)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]
