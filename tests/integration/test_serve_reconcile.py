"""The serve path against the real API server (no kubelet: nothing becomes Ready here; the e2e test runs
the real llama-server and LiteLLM): what the operator creates, what the gateway's config says, whose
name wins, and that deleting an alias removes its routes and (garbage collector) its model servers."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from conftest import wait_for
from kubedistill import Distiller
from kubedistill.api.models import API_VERSION, GROUP, VERSION, DistillationJob
from kubedistill.builders import gateway as gw
from kubedistill.domain.actions import Promote
from kubedistill.domain.alias import promoted_job
from kubedistill.handlers.alias import reconcile_alias
from kubedistill.handlers.gateway import Gateway
from kubedistill.handlers.reconciler import Reconciler
from kubedistill.k8s.client import Kube
from kubedistill.settings import GATEWAY_NAME, Settings

pytestmark = pytest.mark.cluster


def _alias(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "ModelAlias", "metadata": {"name": name}, "spec": spec}


def reconcile(kubeconfig: Path, settings: Settings, namespace: str, name: str) -> None:
    async def go() -> None:
        kube = Kube.from_env(str(kubeconfig))
        try:
            path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/modelaliases/{name}"
            body = await kube.request("GET", path)
            await reconcile_alias(kube, body, datetime.now(UTC), settings, Gateway(kube, settings))
        finally:
            await kube.close()

    asyncio.run(go())


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_serve_objects_routes_names_and_deletion(
    control_plane: Path, k8s_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    custom, core, apps = (
        client.CustomObjectsApi(k8s_api),
        client.CoreV1Api(k8s_api),
        client.AppsV1Api(k8s_api),
    )
    other = f"kd-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": other}})
    settings = Settings(gateway_enabled=True, gateway_namespace=namespace, namespaces=(namespace, other))
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "oai"}, "stringData": {"key": "sk-provider-secret"}}
    )
    create: Callable[[str, dict[str, Any]], Any] = lambda name, spec: custom.create_namespaced_custom_object(  # noqa: E731
        GROUP, VERSION, namespace, "modelaliases", _alias(name, spec)
    )
    create(
        "smart",
        {
            "target": {"ggufURI": "s3://models/student.gguf"},
            "fallback": {
                "provider": {"model": "openai/gpt-4o", "apiKeySecretRef": {"name": "oai", "key": "key"}}
            },
        },
    )
    create("ghost", {"target": {"distillationJob": "does-not-exist"}})
    create(
        "keyless",
        {"target": {"provider": {"model": "openai/x", "apiKeySecretRef": {"name": "nope", "key": "k"}}}},
    )
    for name in ("smart", "ghost", "keyless"):
        reconcile(control_plane, settings, namespace, name)
    keyless = conditions(
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "keyless")
    )
    assert keyless["Ready"]["reason"] == "SecretNotFound" and "nope" in keyless["Ready"]["message"]

    smart = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "smart")
    assert smart["status"]["endpoint"] == {"url": gw.gateway_url(settings), "model": "smart"}
    # The fallback is a provider: routed at once. The GGUF's server is created, not Ready (no kubelet here).
    assert [s["role"] for s in smart["status"]["served"]] == ["fallback"]
    cond = conditions(smart)
    assert cond["Ready"]["status"] == "False" and cond["Progressing"]["status"] == "True"
    assert cond["Progressing"]["reason"] == "WaitingForServer"
    (server,) = apps.list_namespaced_deployment(namespace, label_selector="kubedistill.io/alias=smart").items
    assert server.metadata.owner_references[0].kind == "ModelAlias"
    assert server.metadata.owner_references[0].uid == smart["metadata"]["uid"]
    assert core.read_namespaced_service(server.metadata.name, namespace).spec.ports[0].port == 8080

    ghost = conditions(
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "ghost")
    )
    assert (ghost["Ready"]["reason"], ghost["Progressing"]["reason"]) == ("JobNotFound", "JobNotFound")
    assert "does-not-exist" in ghost["Ready"]["message"]

    config_map = core.read_namespaced_config_map(gw.CONFIG_MAP, namespace)
    config = yaml.safe_load(config_map.data["config.yaml"])
    (entry,) = config["model_list"]
    assert entry["model_name"] == "smart:fallback"
    assert entry["litellm_params"]["api_key"].startswith("os.environ/KD_PROVIDER_KEY_")
    assert "sk-provider-secret" not in config_map.data["config.yaml"]
    keys = core.read_namespaced_secret(gw.KEYS_SECRET, namespace).data
    env_name = entry["litellm_params"]["api_key"].removeprefix("os.environ/")
    assert base64.b64decode(keys[env_name]).decode() == "sk-provider-secret"
    gateway = apps.read_namespaced_deployment(GATEWAY_NAME, namespace)
    checksum = gateway.spec.template.metadata.annotations[gw.CHECKSUM_ANNOTATION]
    assert config_map.metadata.annotations[gw.CHECKSUM_ANNOTATION] == checksum
    assert gateway.spec.strategy.rolling_update.max_unavailable == 0

    # The same alias name in another namespace, created later: the first one keeps model=smart.
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        other,
        "modelaliases",
        _alias("smart", {"target": {"provider": {"model": "openai/x"}}}),
    )
    reconcile(control_plane, settings, other, "smart")
    taken = conditions(custom.get_namespaced_custom_object(GROUP, VERSION, other, "modelaliases", "smart"))
    assert taken["Ready"]["reason"] == "ModelNameTaken" and namespace in taken["Ready"]["message"]
    core.delete_namespace(other)

    # Deleting the alias: its routes leave the config, the garbage collector removes its server.
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "smart")
    wait_for(
        lambda: (
            not [
                a
                for a in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases")[
                    "items"
                ]
                if a["metadata"]["name"] == "smart"
            ]
        ),
        what="alias smart gone",
    )

    async def sync() -> None:
        kube = Kube.from_env(str(control_plane))
        try:
            await Gateway(kube, settings).sync()
        finally:
            await kube.close()

    asyncio.run(sync())
    config = yaml.safe_load(core.read_namespaced_config_map(gw.CONFIG_MAP, namespace).data["config.yaml"])
    assert config["model_list"] == []
    assert (
        apps.read_namespaced_deployment(GATEWAY_NAME, namespace).spec.template.metadata.annotations[
            gw.CHECKSUM_ANNOTATION
        ]
        != checksum
    )
    wait_for(
        lambda: (
            not apps.list_namespaced_deployment(namespace, label_selector="kubedistill.io/alias=smart").items
        ),
        timeout=60,
        what="the model server garbage-collected",
    )


def test_canary_promotion_sets_the_canary_and_keeps_the_primary(
    control_plane: Path, k8s_api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(k8s_api)
    teacher = {"provider": {"model": "openai/gpt-4o"}}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "modelaliases", _alias("smart", {"target": teacher})
    )
    job = DistillationJob.model_validate(
        {
            "metadata": {"name": "v2", "namespace": namespace, "uid": "u"},
            "spec": {
                "teacher": {"model": "t"},
                "student": {"model": "s"},
                "dataset": {"prompts": ["a"]},
                "promotion": {"alias": "smart", "canaryWeight": 20},
            },
        }
    )

    async def promote(alias: str) -> None:
        kube = Kube.from_env(str(control_plane))
        try:
            reconciler = Reconciler(kube, Settings(), post_event=lambda *a, **k: None)
            await reconciler._promote(job, Promote(alias, "q8_0"))
        finally:
            await kube.close()

    asyncio.run(promote("smart"))
    spec = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "smart")["spec"]
    assert spec["target"]["provider"] == teacher["provider"]
    assert spec["canary"] == {"distillationJob": "v2", "quantization": "q8_0", "weight": 20}
    assert promoted_job(spec, as_canary=True) == "v2"
    asyncio.run(promote("fresh"))  # no alias yet: the student becomes its primary (no canary without one)
    fresh = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "fresh")["spec"]
    assert fresh["target"]["distillationJob"] == "v2" and "canary" not in fresh


def holds(stored: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """`stored` has every field of `wanted` (the API server adds defaults, e.g. the quantization)."""
    return stored is not None and wanted.items() <= stored.items()


def test_rollback_restores_the_previous_serving_state_canary_included(
    control_plane: Path, k8s_api: client.ApiClient, namespace: str
) -> None:
    custom = client.CustomObjectsApi(k8s_api)
    teacher = {"provider": {"model": "openai/gpt-4o"}}
    student = {"ggufURI": "s3://models/v2.gguf"}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "modelaliases", _alias("smart", {"target": teacher})
    )

    def step(patch: dict[str, Any]) -> dict[str, Any]:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "smart", patch)
        reconcile(control_plane, Settings(), namespace, "smart")
        found: dict[str, Any] = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "modelaliases", "smart"
        )
        return found

    step({})  # the first resolution records the state it starts from
    step({"spec": {"canary": {**student, "weight": 20}}})  # a canary rollout: the primary stays
    # Then the student takes every request (a merge patch: null drops the provider from the target).
    promoted = step({"spec": {"target": {"provider": None, **student}, "canary": None}})
    newest, older = promoted["status"]["history"][:2]
    assert holds(newest["target"], teacher) and holds(newest["canary"], {**student, "weight": 20})
    assert holds(older["target"], teacher) and "canary" not in older

    with Distiller(namespace=namespace, kubeconfig=control_plane) as d:
        view = d.rollback_alias("smart")
        assert holds(view["target"], teacher) and holds(view["canary"], {**student, "weight": 20})
        assert "ggufURI" not in view["target"]
        # The rollback is a change like any other: rolling back again returns to the promoted state.
        step({})
        again = d.rollback_alias("smart")
        assert holds(again["target"], student) and "provider" not in again["target"]
        assert again["canary"] is None
