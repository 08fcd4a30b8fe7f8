"""What the operator tells the gateway's recorder per alias, and the Recording condition."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from kubedistill.api.alias import ModelAliasSpec
from kubedistill.api.recording import RecordingSpec
from kubedistill.builders import recording as build
from kubedistill.domain.recording import RecordingReason, plan_recording, secret_not_found
from kubedistill.recorder import load_rules
from kubedistill.settings import Settings

SETTINGS = Settings(
    storage_bucket="artifacts", storage_secret="s3-creds", storage_endpoint="http://minio:9000"
)
ROOT = "s3://artifacts/kubedistill"


def plan(**recording: object):  # type: ignore[no-untyped-def]
    return plan_recording("team", "smart", RecordingSpec.model_validate(recording), SETTINGS, ROOT)


def test_no_section_no_condition_and_disabled_says_so() -> None:
    assert plan_recording("team", "smart", None, SETTINGS, ROOT) is None
    off = plan(enabled=False)
    assert off is not None and off.rule is None and (off.status, off.reason) == ("False", "Disabled")


def test_default_destination_uses_the_operators_bucket_and_keys() -> None:
    p = plan(enabled=True, sampleRate=0.5, redact=["email", r"ACME-\d+"])
    assert p is not None and p.rule is not None and p.status == "True" and p.uses_operator_keys
    assert p.rule.destination == "s3://artifacts/kubedistill/recordings/team/smart"
    assert (p.rule.endpoint, p.rule.access_key) == (
        "http://minio:9000",
        "os.environ/KD_RECORDING_AWS_ACCESS_KEY_ID",
    )
    assert (
        p.message
        == r"0.5 of requests stored under s3://artifacts/kubedistill/recordings/team/smart, redacting email, ACME-\d+"
    )
    env = build.operator_key_env(SETTINGS.storage_secret, p.uses_operator_keys)
    assert [e["valueFrom"]["secretKeyRef"] for e in env] == [
        {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"},
        {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"},
    ]


def test_another_bucket_needs_credentials_and_says_which_field() -> None:
    p = plan(enabled=True, destination="s3://elsewhere/rec")
    assert p is not None and p.rule is None
    assert p.reason == RecordingReason.CREDENTIALS_MISSING
    assert "set spec.recording.credentialsSecretRef" in p.message
    ok = plan(enabled=True, destination="s3://elsewhere/rec", credentialsSecretRef="rec-keys")
    assert ok is not None and ok.rule is not None and not ok.uses_operator_keys
    assert [(c.namespace, c.secret, c.key) for c in ok.copies] == [
        ("team", "rec-keys", "AWS_ACCESS_KEY_ID"),
        ("team", "rec-keys", "AWS_SECRET_ACCESS_KEY"),
    ]
    assert ok.rule.access_key == "os.environ/" + ok.copies[0].env
    missing = secret_not_found(ok, "rec-keys")
    assert missing.rule is None and missing.reason == RecordingReason.SECRET_NOT_FOUND
    nothing = plan_recording("team", "smart", RecordingSpec(enabled=True), Settings(), None)
    assert nothing is not None and nothing.reason == RecordingReason.NO_DESTINATION


def test_the_spec_refuses_bad_values_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"redact\[1\] is not a valid regular expression"):
        RecordingSpec.model_validate({"enabled": True, "redact": ["email", "(open"]})
    with pytest.raises(ValidationError, match="sampleRate"):
        RecordingSpec.model_validate({"enabled": True, "sampleRate": 1.5})
    with pytest.raises(ValidationError, match="destination"):
        RecordingSpec.model_validate({"enabled": True, "destination": "bucket/prefix"})
    spec = ModelAliasSpec.model_validate(
        {"target": {"provider": {"model": "openai/gpt-4o"}}, "recording": {"enabled": True}}
    )
    assert spec.recording is not None and spec.recording.redact == ["email", "phone", "card"]


def test_the_gateway_gets_the_callback_the_source_and_the_rules_only_when_recording() -> None:
    config = yaml.safe_dump({"model_list": [], "litellm_settings": {"drop_params": True}})
    assert build.with_callback(config, {}) == config and build.config_files({}) == {}
    p = plan(enabled=True)
    assert p is not None and p.rule is not None
    rules = {"smart": p.rule}
    rendered = yaml.safe_load(build.with_callback(config, rules))
    assert rendered["litellm_settings"] == {"drop_params": True, "callbacks": [build.CALLBACK]}
    files = build.config_files(rules)
    assert files["kubedistill_recorder.py"].startswith('"""The gateway\'s recorder')
    assert load_rules(files["recording.json"]) == rules
    assert json.loads(files["recording.json"]) == json.loads(build.render_recording(dict(rules)))


def test_the_recorder_lands_in_the_gateways_config_directory_with_its_keys() -> None:
    from kubedistill.builders import gateway as gw

    p = plan(enabled=True)
    assert p is not None and p.rule is not None
    files = build.config_files({"smart": p.rule})
    config_map = gw.build_config_map("model_list: []\n", "abc", SETTINGS)
    deployment = gw.build_deployment("abc", SETTINGS, 120)
    build.add_to_gateway(config_map, deployment, files, build.operator_key_env(SETTINGS.storage_secret, True))
    assert set(config_map["data"]) == {gw.CONFIG_KEY, "kubedistill_recorder.py", "recording.json"}
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # The whole ConfigMap is the config's directory, where LiteLLM looks for the callback's module.
    assert {"name": "config", "mountPath": gw.CONFIG_DIR, "readOnly": True} in container["volumeMounts"]
    assert pod["volumes"] == [{"name": "config", "configMap": {"name": gw.CONFIG_MAP}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["KD_RECORDING_AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert not any("value" in e and "s3-creds" in str(e["value"]) for e in container["env"])


def test_recording_without_the_gateway_says_so() -> None:
    import asyncio

    from kubedistill.api.alias import ModelAlias
    from kubedistill.handlers.recording import recording_plan

    alias = ModelAlias.model_validate(
        {
            "metadata": {"name": "smart", "namespace": "team"},
            "spec": {"target": {"provider": {"model": "openai/gpt-4o"}}, "recording": {"enabled": True}},
        }
    )
    found, values = asyncio.run(recording_plan(None, alias, SETTINGS))  # type: ignore[arg-type]
    assert found is not None and found.rule is None and values == {}
    assert (found.reason, found.message) == (
        "RecordingNoGateway",
        "spec.recording needs the operator's gateway, which is off (chart value gateway.enabled)",
    )
