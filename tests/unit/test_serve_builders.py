"""Model server and gateway manifests (pure builders): the shapes the kubelet runs and LiteLLM reads."""

from __future__ import annotations

import base64
from typing import Any

import yaml

from kubedistill.api.alias import ModelAlias, ServerSpec
from kubedistill.builders import gateway as gw
from kubedistill.builders.model_server import GgufSource, build_model_server, server_name, server_version
from kubedistill.settings import Settings, from_mapping

SETTINGS = Settings(
    gateway_enabled=True, gateway_namespace="kd-system", gateway_master_key_secret="gw-master"
)


def alias(name: str = "smart", **server: Any) -> ModelAlias:
    return ModelAlias.model_validate(
        {
            "metadata": {"name": name, "namespace": "team", "uid": "u-1"},
            "spec": {"target": {"ggufURI": "s3://b/m.gguf"}, "server": server},
        }
    )


SOURCE = GgufSource("s3://b/m.gguf", "http://minio:9000", "s3-creds")


def test_model_server_deployment_and_service() -> None:
    deployment, service = build_model_server(alias(ctxSize=2048, parallel=3, replicas=2), SOURCE, SETTINGS)
    name = deployment["metadata"]["name"]
    assert name.startswith("smart-") and len(name) == len("smart-") + 8
    assert service["metadata"]["name"] == name
    assert (
        deployment["metadata"]["ownerReferences"][0] | {"kind": "ModelAlias", "uid": "u-1"}
        == (deployment["metadata"]["ownerReferences"][0])
    )
    labels = deployment["metadata"]["labels"]
    assert (
        labels["kubedistill.io/alias"] == "smart" and labels["app.kubernetes.io/managed-by"] == "kubedistill"
    )
    pod = deployment["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == SETTINGS.trainer_image
    assert fetch["args"] == ["fetch", "--uri", "s3://b/m.gguf", "--out", "/models/model.gguf"]
    env = {e["name"]: e for e in fetch["env"]}
    assert env["KUBEDISTILL_S3_ENDPOINT"]["value"] == "http://minio:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert all("value" not in e or "secret" not in e["value"].lower() for e in fetch["env"])
    (server,) = pod["containers"]
    assert server["image"] == "ghcr.io/ggml-org/llama.cpp:server" and "command" not in server
    args = server["args"]
    assert args[args.index("--alias") + 1] == "smart" and "--metrics" in args
    assert args[args.index("--host") + 1] == "$(POD_IP)" and args[args.index("--port") + 1] == "8080"
    assert (args[args.index("--ctx-size") + 1], args[args.index("--parallel") + 1]) == ("2048", "3")
    assert server["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8080}
    assert server["startupProbe"]["httpGet"]["path"] == "/health"
    drain = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > 120 + drain  # longer than the request timeout
    assert deployment["spec"]["replicas"] == 2
    assert service["spec"]["ports"][0] == {
        "name": "http",
        "port": 8080,
        "targetPort": "http",
        "protocol": "TCP",
    }


def test_version_changes_with_the_artifact_or_settings_only() -> None:
    spec = ServerSpec()
    v = server_version(SOURCE, spec, "img")
    assert v == server_version(GgufSource("s3://b/m.gguf", "http://minio:9000", "other-secret"), spec, "img")
    assert v != server_version(GgufSource("s3://b/other.gguf", "http://minio:9000"), spec, "img")
    assert v != server_version(SOURCE, ServerSpec(ctx_size=8192), "img")
    assert v != server_version(SOURCE, spec, "img2")
    long = server_name("a" * 80, v)
    assert len(long) <= 63 and long.endswith(f"-{v}")


def test_placement_and_resources_from_the_spec() -> None:
    deployment, _ = build_model_server(
        alias(
            nodeSelector={"pool": "cpu"}, tolerations=[{"key": "k", "operator": "Exists"}], image="my/llama:1"
        ),
        SOURCE,
        SETTINGS,
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["tolerations"][0]["key"] == "k"
    assert pod["containers"][0]["image"] == "my/llama:1"
    assert pod["containers"][0]["resources"] == SETTINGS.server_resources.to_k8s()


ROUTES = [
    gw.Route(
        "smart",
        "primary",
        80,
        "team/smart-aaaa",
        "openai/smart",
        "http://smart-aaaa.team.svc:8080/v1",
        None,
        60,
    ),
    gw.Route(
        "smart",
        "canary",
        20,
        "team/smart-bbbb",
        "openai/smart",
        "http://smart-bbbb.team.svc:8080/v1",
        None,
        60,
    ),
    gw.Route(
        "smart",
        "fallback",
        0,
        "team/smart/fallback-provider-1",
        "openai/gpt-4o",
        None,
        "KD_PROVIDER_KEY_X",
        90,
    ),
    gw.Route("other", "primary", 100, "x/other/primary-provider-2", "anthropic/claude", None, None, 30),
]


def test_litellm_config() -> None:
    text = gw.render_config(ROUTES, master_key=True)
    config = yaml.safe_load(text)
    by_id = {e["model_info"]["id"]: e for e in config["model_list"]}
    assert [e["model_name"] for e in config["model_list"]] == ["other", "smart", "smart", "smart:fallback"]
    primary = by_id["team/smart-aaaa"]["litellm_params"]
    assert primary == {
        "model": "openai/smart",
        "timeout": 60,
        "api_base": "http://smart-aaaa.team.svc:8080/v1",
        "api_key": gw.NO_KEY,
        "weight": 80,
    }
    assert by_id["team/smart-bbbb"]["litellm_params"]["weight"] == 20
    fallback = by_id["team/smart/fallback-provider-1"]["litellm_params"]
    assert fallback["api_key"] == "os.environ/KD_PROVIDER_KEY_X" and "weight" not in fallback
    router = config["router_settings"]
    assert router["fallbacks"] == [{"smart": ["smart:fallback"]}]
    assert router["num_retries"] == gw.NUM_RETRIES and router["routing_strategy"] == "simple-shuffle"
    assert router["timeout"] == 90
    assert config["general_settings"] == {"master_key": "os.environ/LITELLM_MASTER_KEY"}
    assert gw.render_config(list(reversed(ROUTES)), master_key=True) == text  # order-independent bytes
    assert gw.routed_ids(text) == frozenset(by_id)
    assert "general_settings" not in yaml.safe_load(gw.render_config(ROUTES, master_key=False))


def test_gateway_objects() -> None:
    config = gw.render_config(ROUTES, master_key=True)
    keys = {"KD_PROVIDER_KEY_X": "sk-very-secret"}
    checksum = gw.checksum(config, keys)
    assert checksum != gw.checksum(config, {"KD_PROVIDER_KEY_X": "sk-rotated"})
    config_map = gw.build_config_map(config, checksum, SETTINGS)
    assert config_map["metadata"]["namespace"] == "kd-system" and config_map["data"]["config.yaml"] == config
    assert "sk-very-secret" not in yaml.safe_dump(config_map) and "sk-very-secret" not in checksum
    secret = gw.build_keys_secret(keys, SETTINGS)
    assert base64.b64decode(secret["data"]["KD_PROVIDER_KEY_X"]).decode() == "sk-very-secret"
    deployment = gw.build_deployment(checksum, SETTINGS, 90)
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"][gw.CHECKSUM_ANNOTATION] == checksum
    (container,) = template["spec"]["containers"]
    assert "command" not in container and container["image"] == SETTINGS.gateway_image
    assert container["args"] == [
        "--config",
        "/etc/litellm/config.yaml",
        "--host",
        "$(POD_IP)",
        "--port",
        "4000",
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["LITELLM_MASTER_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "gw-master",
        "key": "master-key",
    }
    assert container["envFrom"] == [{"secretRef": {"name": gw.KEYS_SECRET, "optional": True}}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert template["spec"]["terminationGracePeriodSeconds"] > 90
    assert gw.build_service(SETTINGS)["spec"]["ports"][0]["port"] == 4000
    assert gw.gateway_url(SETTINGS) == "http://kubedistill-gateway.kd-system.svc.cluster.local:4000/v1"


def _gateway(generation: int, ready: int, replicas: int, checksum: str) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {
            "replicas": 1,
            "template": {"metadata": {"annotations": {gw.CHECKSUM_ANNOTATION: checksum}}},
        },
        "status": {
            "observedGeneration": generation,
            "updatedReplicas": ready,
            "availableReplicas": ready,
            "replicas": replicas,
        },
    }


def test_rolled_out_config_only_when_every_pod_runs_it() -> None:
    config_map = gw.build_config_map("model_list: []\n", "c1", SETTINGS)
    assert gw.rolled_out_config(_gateway(2, 1, 1, "c1"), config_map) == "model_list: []\n"
    assert gw.rolled_out_config(_gateway(2, 1, 2, "c1"), config_map) is None  # an old pod still serves
    assert gw.rolled_out_config(_gateway(2, 0, 1, "c1"), config_map) is None  # the new pod is not Ready
    assert gw.rolled_out_config(_gateway(2, 1, 1, "c0"), config_map) is None  # not yet the new template
    assert gw.rolled_out_config(None, config_map) is None


def test_settings_from_env() -> None:
    settings = from_mapping(
        {
            "KUBEDISTILL_GATEWAY_ENABLED": "true",
            "KUBEDISTILL_GATEWAY_NAMESPACE": "kd",
            "KUBEDISTILL_GATEWAY_MASTER_KEY_SECRET": "m",
            "KUBEDISTILL_SERVER_IMAGE": "llama:x",
            "KUBEDISTILL_SERVER_RESOURCES": '{"requests": {"cpu": "2"}}',
        }
    )
    assert (
        settings.gateway_enabled and settings.gateway_namespace == "kd" and settings.server_image == "llama:x"
    )
    assert settings.gateway_master_key_secret == "m" and settings.server_resources.requests == {"cpu": "2"}
    assert not Settings().gateway_enabled
