"""The gateway: LiteLLM's proxy, routing `model=<alias>` to model servers and provider APIs.

The operator renders the proxy's `config.yaml` (LiteLLM's documented proxy format: `model_list` entries
of `model_name` + `litellm_params`, a `weight` per deployment for the weighted pick of its
`simple-shuffle` strategy, `router_settings.fallbacks`, `num_retries`, `timeout`) into a ConfigMap.
LiteLLM's OSS proxy reads that file once at start, so a config change rolls the gateway: a checksum
annotation on the pod template, maxUnavailable 0 and maxSurge 1 (as LiteLLM's own chart does), so a
new pod with the new routes is Ready before an old one stops. Provider keys reach the proxy as env vars
from a Secret the operator keeps (`api_key: os.environ/<VAR>`), never as values in the config.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from kubedistill.api.alias import Role
from kubedistill.domain.naming import LABEL_MANAGED_BY, MANAGED_BY
from kubedistill.settings import GATEWAY_NAME, Settings

PORT = 4000
CONFIG_MAP = f"{GATEWAY_NAME}-config"
KEYS_SECRET = f"{GATEWAY_NAME}-keys"
CONFIG_KEY = "config.yaml"
CONFIG_DIR = "/etc/litellm"
CHECKSUM_ANNOTATION = "kubedistill.io/config-checksum"
MASTER_KEY_ENV = "LITELLM_MASTER_KEY"
FALLBACK_SUFFIX = ":fallback"
NUM_RETRIES = 2
DRAIN_SECONDS = 5
# llama-server and most OpenAI-compatible servers take any key without --api-key; LiteLLM's OpenAI
# client insists on one. Not a secret.
NO_KEY = "unused"
OFFLINE_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
LABELS = {LABEL_MANAGED_BY: MANAGED_BY, "app.kubernetes.io/name": GATEWAY_NAME}


@dataclass(frozen=True)
class Route:
    """One deployment the gateway may send `model_name` requests to."""

    model_name: str
    role: Role
    weight: int
    deployment_id: str
    model: str
    api_base: str | None
    api_key_env: str | None
    timeout_seconds: int


def gateway_url(settings: Settings) -> str:
    return f"http://{GATEWAY_NAME}.{settings.gateway_namespace}.svc.cluster.local:{PORT}/v1"


def key_env_name(namespace: str, secret: str, key: str) -> str:
    """The gateway env var holding one provider key: stable, and free of the characters env names forbid."""
    digest = hashlib.sha256(f"{namespace}/{secret}/{key}".encode()).hexdigest()[:12].upper()
    return f"KD_PROVIDER_KEY_{digest}"


def _entry(route: Route) -> dict[str, Any]:
    params: dict[str, Any] = {"model": route.model, "timeout": route.timeout_seconds}
    if route.api_base is not None:
        params["api_base"] = route.api_base
    params["api_key"] = f"os.environ/{route.api_key_env}" if route.api_key_env else NO_KEY
    name = route.model_name
    if route.role == "fallback":
        name += FALLBACK_SUFFIX
    else:
        params["weight"] = route.weight
    return {"model_name": name, "litellm_params": params, "model_info": {"id": route.deployment_id}}


def render_config(routes: Sequence[Route], master_key: bool) -> str:
    """LiteLLM proxy config.yaml for every route of every alias (sorted: the same routes, the same bytes)."""
    ordered = sorted(routes, key=lambda r: (r.model_name, r.role != "primary", r.role, r.deployment_id))
    fallbacks = sorted({r.model_name for r in ordered if r.role == "fallback"})
    router: dict[str, Any] = {"routing_strategy": "simple-shuffle", "num_retries": NUM_RETRIES}
    if ordered:
        router["timeout"] = max(r.timeout_seconds for r in ordered)
    if fallbacks:
        router["fallbacks"] = [{name: [name + FALLBACK_SUFFIX]} for name in fallbacks]
    config: dict[str, Any] = {
        "model_list": [_entry(r) for r in ordered],
        "router_settings": router,
        "litellm_settings": {"drop_params": True},
    }
    if master_key:
        config["general_settings"] = {"master_key": f"os.environ/{MASTER_KEY_ENV}"}
    return yaml.safe_dump(config, sort_keys=False)


def checksum(config: str, keys: Mapping[str, str]) -> str:
    """Changes with the config or any key (hashed per value: the annotation never holds a key)."""
    digests = {name: hashlib.sha256(value.encode()).hexdigest() for name, value in sorted(keys.items())}
    return hashlib.sha256(json.dumps([config, digests]).encode()).hexdigest()[:16]


def build_config_map(config: str, config_checksum: str, settings: Settings) -> dict[str, Any]:
    """The config, annotated with the checksum the gateway pods must carry to be running it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": settings.gateway_namespace,
            "labels": LABELS,
            "annotations": {CHECKSUM_ANNOTATION: config_checksum},
        },
        "data": {CONFIG_KEY: config},
    }


def build_keys_secret(keys: Mapping[str, str], settings: Settings) -> dict[str, Any]:
    """Provider keys copied from the aliases' Secrets (values never leave Secrets)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": KEYS_SECRET, "namespace": settings.gateway_namespace, "labels": LABELS},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in sorted(keys.items())},
    }


def build_deployment(config_checksum: str, settings: Settings, longest_request_s: int) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # LiteLLM otherwise downloads its model cost map at start: a timeout on an air-gapped cluster.
        *({"name": k, "value": v} for k, v in OFFLINE_ENV.items()),
    ]
    if settings.gateway_master_key_secret:
        ref = {"name": settings.gateway_master_key_secret, "key": settings.gateway_master_key_key}
        env.append({"name": MASTER_KEY_ENV, "valueFrom": {"secretKeyRef": ref}})
    probe = {"httpGet": {"path": "/health/readiness", "port": PORT}, "periodSeconds": 2, "timeoutSeconds": 3}
    container = {
        "name": "litellm",
        "image": settings.gateway_image,
        "imagePullPolicy": settings.image_pull_policy,
        # No command: the image's entrypoint starts the proxy with these arguments.
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--host", "$(POD_IP)", "--port", str(PORT)],
        "env": env,
        "envFrom": [{"secretRef": {"name": KEYS_SECRET, "optional": True}}],
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": settings.gateway_resources.to_k8s(),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        "startupProbe": {**probe, "failureThreshold": 150},
        "readinessProbe": {**probe, "failureThreshold": 2},
        # Out of the Service first, then stop: requests already sent to this pod still finish.
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": GATEWAY_NAME, "namespace": settings.gateway_namespace, "labels": LABELS},
        "spec": {
            "replicas": settings.gateway_replicas,
            "selector": {"matchLabels": LABELS},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": LABELS, "annotations": {CHECKSUM_ANNOTATION: config_checksum}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": longest_request_s + DRAIN_SECONDS + 5,
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": CONFIG_MAP}}],
                },
            },
        },
    }


def build_service(settings: Settings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": GATEWAY_NAME, "namespace": settings.gateway_namespace, "labels": LABELS},
        "spec": {
            "selector": LABELS,
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def routed_ids(config: str) -> frozenset[str]:
    """The deployment ids a rendered config routes to."""
    parsed = yaml.safe_load(config) or {}
    return frozenset(str(e["model_info"]["id"]) for e in parsed.get("model_list") or [])


def rolled_out_config(
    deployment: Mapping[str, Any] | None, config_map: Mapping[str, Any] | None
) -> str | None:
    """The config every gateway pod runs, or None while a rollout (or the first start) is under way.

    Complete means the Deployment controller has seen the latest template, and every replica is updated,
    available, and the only one left (no pod of an older template still serving).
    """
    if deployment is None or config_map is None:
        return None
    meta, spec, status = (
        deployment.get("metadata") or {},
        deployment.get("spec") or {},
        deployment.get("status") or {},
    )
    want = int(spec.get("replicas", 1))
    complete = (
        int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        and int(status.get("updatedReplicas") or 0) == want
        and int(status.get("availableReplicas") or 0) == want
        and int(status.get("replicas") or 0) == want
        and not int(status.get("terminatingReplicas") or 0)
    )
    template = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    expected = ((config_map.get("metadata") or {}).get("annotations") or {}).get(CHECKSUM_ANNOTATION)
    if not complete or expected is None or template.get(CHECKSUM_ANNOTATION) != expected:
        return None
    config: str | None = (config_map.get("data") or {}).get(CONFIG_KEY)
    return config
