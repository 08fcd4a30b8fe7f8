"""Recording through the operator's reconcile, against the real API server: the gateway's ConfigMap gets
the recorder and the rules of the aliases that record, keys only by reference, and each alias a
Recording condition that names the field to fix."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubedistill.api.models import API_VERSION, GROUP, VERSION
from kubedistill.builders import gateway as gw
from kubedistill.builders.recording import CALLBACK, RECORDER_FILE
from kubedistill.handlers.alias import reconcile_alias
from kubedistill.handlers.gateway import Gateway
from kubedistill.k8s.client import Kube
from kubedistill.recorder import RECORDING_FILE
from kubedistill.settings import GATEWAY_NAME, Settings

pytestmark = pytest.mark.cluster

PROVIDER = {"provider": {"model": "openai/teacher", "baseURL": "http://teacher.example:8000/v1"}}
KEY_ID, SECRET = "rec-key-id-3f9a", "rec-secret-value-8c1d"


def reconcile_all(kubeconfig: Path, settings: Settings, namespace: str, names: list[str]) -> None:
    async def go() -> None:
        kube = Kube.from_env(str(kubeconfig))
        try:
            gateway = Gateway(kube, settings)
            for name in names:
                body = await kube.request(
                    "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/modelaliases/{name}"
                )
                await reconcile_alias(kube, body, datetime.now(UTC), settings, gateway)
        finally:
            await kube.close()

    asyncio.run(go())


def test_recording_reaches_the_gateway_config_and_each_alias_says_why_or_why_not(
    control_plane: Path, k8s_api: client.ApiClient, namespace: str
) -> None:
    custom, core, apps = (
        client.CustomObjectsApi(k8s_api),
        client.CoreV1Api(k8s_api),
        client.AppsV1Api(k8s_api),
    )
    settings = Settings(
        gateway_enabled=True,
        gateway_namespace=namespace,
        namespaces=(namespace,),
        storage_bucket="artifacts",
        storage_secret="s3-creds",
        storage_endpoint="http://s3.example:9000",
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "rec-keys"},
            "stringData": {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET},
        },
    )
    specs: dict[str, dict[str, Any]] = {
        "smart": {"enabled": True, "sampleRate": 0.25, "redact": ["email", "card"]},
        "quiet": {},  # no recording section at all
        "paused": {"enabled": False},
        "elsewhere": {"enabled": True, "destination": "s3://other-bucket/rec"},
        "nokeys": {
            "enabled": True,
            "destination": "s3://other-bucket/rec",
            "credentialsSecretRef": "missing",
        },
        "owned": {
            "enabled": True,
            "destination": "s3://other-bucket/rec",
            "credentialsSecretRef": "rec-keys",
        },
    }
    for name, recording in specs.items():
        spec = {"target": PROVIDER, **({"recording": recording} if recording else {})}
        body = {"apiVersion": API_VERSION, "kind": "ModelAlias", "metadata": {"name": name}, "spec": spec}
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", body)
    reconcile_all(control_plane, settings, namespace, list(specs))

    def recording_condition(name: str) -> dict[str, Any] | None:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", name)
        found = [c for c in obj["status"]["conditions"] if c["type"] == "Recording"]
        return found[0] if found else None

    smart = recording_condition("smart")
    assert smart is not None and (smart["status"], smart["reason"]) == ("True", "Recording")
    assert smart["message"] == (
        f"0.25 of requests stored under s3://artifacts/kubedistill/recordings/{namespace}/smart, redacting email, card"
    )
    assert recording_condition("quiet") is None
    paused = recording_condition("paused")
    assert paused is not None and (paused["status"], paused["reason"]) == ("False", "Disabled")
    elsewhere = recording_condition("elsewhere")
    assert elsewhere is not None and elsewhere["reason"] == "RecordingCredentialsMissing"
    assert "set spec.recording.credentialsSecretRef" in elsewhere["message"]
    nokeys = recording_condition("nokeys")
    assert (
        nokeys is not None
        and nokeys["reason"] == "RecordingSecretNotFound"
        and "Secret missing" in nokeys["message"]
    )
    owned = recording_condition("owned")
    assert owned is not None and owned["status"] == "True"

    config_map = core.read_namespaced_config_map(gw.CONFIG_MAP, namespace)
    config = yaml.safe_load(config_map.data[gw.CONFIG_KEY])
    assert config["litellm_settings"]["callbacks"] == [CALLBACK]
    assert {e["model_name"] for e in config["model_list"]} >= set(specs)
    rules = json.loads(config_map.data[RECORDING_FILE])["models"]
    assert set(rules) == {"smart", "owned"}
    assert rules["smart"]["accessKeyId"] == "os.environ/KD_RECORDING_AWS_ACCESS_KEY_ID"
    assert rules["smart"]["endpoint"] == "http://s3.example:9000" and rules["smart"]["sampleRate"] == 0.25
    assert config_map.data[RECORDER_FILE].startswith('"""The gateway\'s recorder')
    assert KEY_ID not in json.dumps(config_map.data) and SECRET not in json.dumps(config_map.data)

    keys = core.read_namespaced_secret(gw.KEYS_SECRET, namespace).data
    copied_env = rules["owned"]["accessKeyId"].removeprefix("os.environ/")
    assert base64.b64decode(keys[copied_env]).decode() == KEY_ID
    deployment = apps.read_namespaced_deployment(GATEWAY_NAME, namespace)
    env = {e.name: e for e in deployment.spec.template.spec.containers[0].env}
    ref = env["KD_RECORDING_AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref
    assert (ref.name, ref.key) == ("s3-creds", "AWS_SECRET_ACCESS_KEY")

    # Recording off everywhere: no callback, no recorder, no rules.
    for name in ("smart", "owned"):
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "modelaliases", name, {"spec": {"recording": {"enabled": False}}}
        )
    reconcile_all(control_plane, settings, namespace, ["smart", "owned"])
    data = core.read_namespaced_config_map(gw.CONFIG_MAP, namespace).data
    assert "callbacks" not in (yaml.safe_load(data[gw.CONFIG_KEY]).get("litellm_settings") or {})
    assert RECORDING_FILE not in data and RECORDER_FILE not in data
