"""The Helm chart: lint, render three value sets through kubernetes-validate, RBAC shape, settings the
operator really parses, CRDs equal to crds/, values.schema.json refusing bad values, README current."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubedistill.api.models import STAGES, ResourceRequirements, Stage
from kubedistill.settings import from_mapping
from kubedistill_testing import helm
from kubedistill_testing.cluster import pinned_version, tools_module_dir
from kubedistill_testing.helm import VALUE_SETS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubedistill"
NAMESPACE = "kubedistill-system"
# Kinds of other projects' CRDs: kubernetes-validate knows only built-in kinds.
THIRD_PARTY = {"ServiceMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering"}


def kube_version() -> str:
    """The Kubernetes version of the test control plane (k8s.io/kubernetes vX.Y.Z in its go.mod)."""
    return pinned_version((tools_module_dir() / "go.mod").read_text()).lstrip("v")


def is_uninstall_hook(doc: dict[str, Any]) -> bool:
    return ((doc["metadata"].get("annotations")) or {}).get("helm.sh/hook") == "pre-delete"


@pytest.fixture(scope="module")
def render_all() -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """Everything `helm install` creates, and the uninstall hook's objects."""
    helm.build()
    return lambda values: helm.template(
        values, namespace=NAMESPACE, kube_version=kube_version(), include_crds=True
    )


@pytest.fixture(scope="module")
def render(
    render_all: Callable[..., list[dict[str, Any]]],
) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """What `helm install` creates (the uninstall hook's objects live only while it runs)."""
    return lambda values: [d for d in render_all(values) if not is_uninstall_hook(d)]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    (found,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    return found


def settings_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", "-settings")["data"]
    return data


def rules_of(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# ------------------------------------------------------------------------------------- lint, render


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name: str, tmp_path: Path) -> None:
    helm.build()
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUE_SETS[name]))
    result = helm.run(["lint", "--strict", str(CHART), "--values", str(values)], check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_pass_kubernetes_validate(
    name: str, render_all: Callable[..., list[dict[str, Any]]]
) -> None:
    docs = render_all(VALUE_SETS[name])
    version = kube_version()
    checked = 0
    for doc in docs:
        if doc["kind"] in THIRD_PARTY:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")
        checked += 1
    assert checked >= 8


def test_defaults_run_one_operator_cluster_wide(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render({})
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/kubedistill/operator:0.1.0"
    assert container["args"] == ["--liveness=http://0.0.0.0:8080/healthz", "--metrics-port=9090"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"] == {"fieldPath": "metadata.namespace"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"health": 8080, "metrics": 9090}
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "KUBEDISTILL_PEERING" not in settings_of(docs)
    assert (
        [r["metadata"]["name"] for r in by_kind(docs, "Role")] == ["kd-kubedistill-gateway"]
        and not by_kind(docs, "KopfPeering")
        and not by_kind(docs, "ClusterKopfPeering")
    )
    service = one(docs, "Service", "-metrics")
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PrometheusRule")
    assert not by_kind(docs, "NetworkPolicy")
    # The only Secret: the gateway's generated master key.
    (master,) = by_kind(docs, "Secret")
    assert master["metadata"]["name"] == "kd-kubedistill-gateway-master-key"
    assert base64.b64decode(master["data"]["master-key"]).decode().startswith("sk-")


def test_defaults_are_the_operators_own_defaults(render: Callable[..., list[dict[str, Any]]]) -> None:
    """The chart's per-stage defaults go through kubedistill.settings exactly as the operator reads them."""
    settings = from_mapping(settings_of(render({})))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert settings.trainer_image == "ghcr.io/kubedistill/trainer:0.1.0"
    for stage in STAGES:
        expected = ResourceRequirements.model_validate(values["stages"][stage.value]["resources"])
        assert settings.stage_resources[stage] == expected
    assert settings.train_gpus == 1 and settings.default_gpus[Stage.GENERATE] == 0
    assert settings.gpu_tolerations == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert settings.storage_bucket is None and settings.namespaces == ()


def test_gpu_values_reach_the_operator_settings(render: Callable[..., list[dict[str, Any]]]) -> None:
    values = VALUE_SETS["gpu"]
    docs = render(values)
    settings = from_mapping(settings_of(docs))
    assert settings.train_gpus == 2
    # Helm merges maps: the requests given, the default limit kept.
    assert settings.stage_resources[Stage.TRAIN] == ResourceRequirements(
        requests={"cpu": "8", "memory": "64Gi"}, limits={"memory": "32Gi"}
    )
    # Two replicas: kopf peering, cluster-wide, with its CRDs (from the chart's crds/) and peering object.
    assert settings.peering == "kubedistill"
    assert one(docs, "Deployment")["spec"]["replicas"] == 2
    assert "strategy" not in one(docs, "Deployment")["spec"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "kubedistill"
    crds = {d["metadata"]["name"] for d in by_kind(docs, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in rules_of(
        one(docs, "ClusterRole", "kd-kubedistill")
    )
    rule = one(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert alerts["KubedistillJobStuckPending"]["expr"].endswith("> 1800")
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"


def test_multi_team_scopes_reach_the_operator_and_the_admission_policy(
    render: Callable[..., list[dict[str, Any]]],
) -> None:
    docs = render(VALUE_SETS["multi-team"])
    settings = from_mapping(settings_of(docs))
    a, b = settings.storage_scopes
    assert (a.namespace, a.root, a.secret) == ("team-a", "s3://teams/a/", "s3-team-a")
    assert (b.label, b.root, b.service_account) == (
        ("kubedistill.io/team", "b"),
        "s3://teams/b/",
        "team-b-s3",
    )
    assert not settings.allow_default_scope and settings.shared_read_uris == ("s3://models-cache/",)
    assert settings.allowed_image_prefixes == ("ghcr.io/kubedistill/", "registry.example.com/ml/")
    bindings = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "ValidatingAdmissionPolicyBinding")}
    assert set(bindings) == {
        "kd-kubedistill-scope-0",
        "kd-kubedistill-scope-1",
        "kd-kubedistill-scope-default",
    }
    # The parameters live in the release namespace, out of the teams' reach.
    assert {spec["paramRef"]["namespace"] for spec in bindings.values()} == {NAMESPACE}
    assert bindings["kd-kubedistill-scope-default"]["matchResources"]["namespaceSelector"][
        "matchExpressions"
    ] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["team-a"]},
        {"key": "kubedistill.io/team", "operator": "NotIn", "values": ["b"]},
    ]
    assert one(docs, "ConfigMap", "-scope-default")["data"]["refuse"] == "true"
    # A label scope: the operator reads namespaces' labels.
    assert ("", "namespaces", "get") in rules_of(one(docs, "ClusterRole", "kd-kubedistill"))
    assert ("", "namespaces", "get") not in rules_of(one(render({}), "ClusterRole", "kd-kubedistill"))


def test_the_default_queue_reaches_the_operator_settings(render: Callable[..., list[dict[str, Any]]]) -> None:
    assert from_mapping(settings_of(render({}))).queue_name is None
    assert from_mapping(settings_of(render({"kueue": {"queueName": "gpu"}}))).queue_name == "gpu"


def test_minio_gives_each_namespace_scope_its_own_user_confined_to_its_prefix(
    render: Callable[..., list[dict[str, Any]]],
) -> None:
    values = {**VALUE_SETS["multi-team"], "minio": {"enabled": True}}
    values["storage"] = {**values["storage"], "existingSecret": ""}
    docs = render(values)
    (team_a,) = [d for d in by_kind(docs, "Secret") if d["metadata"]["namespace"] == "team-a"]
    assert team_a["metadata"]["name"] == "s3-team-a"
    keys = team_a["stringData"]
    # The label-selected scope names no namespace at render time: no Secret is made for it.
    assert not [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == "s3-team-b"]
    users = one(docs, "Secret", "-minio-scope-users")["stringData"]
    assert users == {"0.access": keys["AWS_ACCESS_KEY_ID"], "0.secret": keys["AWS_SECRET_ACCESS_KEY"]}
    assert users["0.access"] != "kubedistill" and len(users["0.secret"]) == 40
    policies = one(docs, "ConfigMap", "-minio-scope-policies")["data"]
    assert set(policies) == {"0.json"} and keys["AWS_SECRET_ACCESS_KEY"] not in policies["0.json"]
    statements = json.loads(policies["0.json"])["Statement"]
    resources = {r for st in statements for r in st["Resource"]}
    assert resources == {
        "arn:aws:s3:::teams/a/*",
        "arn:aws:s3:::teams",
        "arn:aws:s3:::models-cache/*",
        "arn:aws:s3:::models-cache",
    }
    writes = [st for st in statements if "s3:PutObject" in st["Action"]]
    assert [st["Resource"] for st in writes] == [["arn:aws:s3:::teams/a/*"]]
    listing = [
        st["Condition"]["StringLike"]["s3:prefix"] for st in statements if st["Action"] == ["s3:ListBucket"]
    ]
    assert sorted(listing) == [["*"], ["a/*"]]
    job = one(docs, "Job", "-minio-scope-users")
    assert job["metadata"]["annotations"]["helm.sh/hook-weight"] == "1"
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    for command in (
        'mb --ignore-existing "local/teams"',
        'admin policy create local "kd-scope-0"',
        "admin user add local",
        'admin policy attach local "kd-scope-0"',
    ):
        assert command in script
    assert keys["AWS_SECRET_ACCESS_KEY"] not in script
    assert not [
        d
        for d in render({**values, "minio": {"enabled": True, "scopeUsers": False}})
        if d["metadata"]["name"].endswith("-minio-scope-users")
    ]


def test_namespaced_install_with_minio(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render(VALUE_SETS["namespaced-minio"])
    settings = from_mapping(settings_of(docs))
    minio = "kd-kubedistill-minio"
    assert settings.namespaces == ("ml", "research")
    assert settings.storage_endpoint == f"http://{minio}.{NAMESPACE}.svc:9000"
    assert (settings.storage_bucket, settings.storage_secret) == ("kubedistill", minio)
    secret = one(docs, "Secret", "-minio")
    assert secret["metadata"]["name"] == minio
    assert len(secret["stringData"]["AWS_SECRET_ACCESS_KEY"]) == 32
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"] == secret["stringData"]["MINIO_ROOT_PASSWORD"]
    service = one(docs, "Service", "-minio")
    assert service["spec"]["ports"][0]["port"] == 9000
    assert one(docs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "5Gi"
    bucket_job = one(docs, "Job", "-bucket")
    assert "local/kubedistill" in bucket_job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    operator_env = {
        e["name"]: e
        for e in one(docs, "Deployment", "kd-kubedistill")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert operator_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": minio,
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert operator_env["KUBEDISTILL_S3_ENDPOINT"]["value"] == settings.storage_endpoint
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
    assert policies["kd-kubedistill"]["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "obs"}}}
    ]
    assert minio in policies


# -------------------------------------------------------------------------------------------- RBAC


# Exactly the calls of kubedistill.k8s.resources plus kopf's watches, annotation patches and events.
JOB_RULES = {
    *{
        ("kubedistill.io", resource, verb)
        for resource in ("distillationjobs", "modelaliases")
        for verb in ("get", "list", "watch", "patch")
    },
    ("kubedistill.io", "modelaliases", "create"),
    ("kubedistill.io", "distillationjobs/status", "patch"),
    ("kubedistill.io", "modelaliases/status", "patch"),
    ("kubedistill.io", "distillationjobs/finalizers", "update"),
    ("kubedistill.io", "modelaliases/finalizers", "update"),
    *{("batch", "jobs", verb) for verb in ("create", "get", "list", "watch", "patch", "delete")},
    ("", "pods", "list"),
    ("", "configmaps", "get"),
    ("", "configmaps", "create"),
    ("", "services", "get"),
    ("", "services", "create"),
    ("", "events", "create"),
    ("kueue.x-k8s.io", "workloads", "list"),
    ("kueue.x-k8s.io", "workloads", "patch"),
}
# Model servers of the aliases a namespace serves (the gateway is on by default).
SERVING_RULES = {
    *{("apps", "deployments", verb) for verb in ("get", "list", "watch", "create", "patch", "delete")},
    *{("", "services", verb) for verb in ("get", "create", "patch", "delete")},
}
FORBIDDEN = {
    (group, resource, verb)
    for group, resource in (
        ("", "nodes"),
        ("rbac.authorization.k8s.io", "clusterroles"),
        ("rbac.authorization.k8s.io", "roles"),
    )
    for verb in ("create", "update", "patch", "delete", "bind", "escalate")
} | {("", "secrets", verb) for verb in ("get", "list", "watch", "create", "update", "patch", "delete")}


def test_cluster_wide_rbac_has_no_secret_node_or_rbac_access(
    render: Callable[..., list[dict[str, Any]]],
) -> None:
    docs = render({})
    cluster = rules_of(one(docs, "ClusterRole", "kd-kubedistill"))
    assert cluster == JOB_RULES | SERVING_RULES | {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    assert not cluster & FORBIDDEN
    assert all("*" not in rule for rule in cluster)
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kd-kubedistill", "namespace": NAMESPACE}
    ]


def test_namespaced_rbac_is_roles_in_the_watched_namespaces(
    render: Callable[..., list[dict[str, Any]]],
) -> None:
    docs = render(VALUE_SETS["namespaced-minio"])
    cluster = rules_of(one(docs, "ClusterRole", "kd-kubedistill"))
    # Cluster-wide only what kopf needs to notice CRDs and namespaces come and go: nothing about jobs.
    assert cluster == {
        (group, resource, verb)
        for group, resource in (("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces"))
        for verb in ("list", "watch")
    }
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): rules_of(r) for r in by_kind(docs, "Role")}
    for ns in ("ml", "research"):
        assert roles[(ns, "kd-kubedistill")] == JOB_RULES | SERVING_RULES
        assert not roles[(ns, "kd-kubedistill")] & FORBIDDEN
        assert roles[(ns, "kd-kubedistill-secrets")] == {("", "secrets", "get")}
    assert {ns for ns, _ in roles} == {"ml", "research", NAMESPACE}
    bindings = by_kind(docs, "RoleBinding")
    assert len(bindings) == 5 and all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)


def test_the_gateway_role_is_its_own_objects_in_the_release_namespace(
    render: Callable[..., list[dict[str, Any]]],
) -> None:
    role = one(render({}), "Role", "-gateway")
    assert role["metadata"]["namespace"] == NAMESPACE
    named = {
        (rule["apiGroups"][0], resource, tuple(rule["resourceNames"]))
        for rule in role["rules"]
        if "resourceNames" in rule
        for resource in rule["resources"]
    }
    assert ("", "secrets", ("kubedistill-gateway-keys",)) in named
    unnamed = {
        (rule["apiGroups"][0], resource, verb)
        for rule in role["rules"]
        if "resourceNames" not in rule
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # Only `create` (server-side apply of an object not there yet) cannot be limited by name.
    assert {verb for _, _, verb in unnamed} == {"create"}
    off = render({"gateway": {"enabled": False}})
    assert not [r for r in by_kind(off, "Role")] and not by_kind(off, "Secret")
    assert "KUBEDISTILL_GATEWAY_ENABLED" not in settings_of(off)
    assert not rules_of(one(off, "ClusterRole", "kd-kubedistill")) & (SERVING_RULES - JOB_RULES)


def test_gateway_values_reach_the_operator_settings(render: Callable[..., list[dict[str, Any]]]) -> None:
    settings = from_mapping(
        settings_of(render({"gateway": {"masterKey": {"existingSecret": "mine", "key": "k"}, "replicas": 2}}))
    )
    assert settings.gateway_enabled and settings.gateway_namespace == NAMESPACE
    assert (settings.gateway_master_key_secret, settings.gateway_master_key_key) == ("mine", "k")
    assert settings.gateway_replicas == 2 and settings.gateway_image.startswith("ghcr.io/berriai/litellm:")
    assert settings.server_image == "ghcr.io/ggml-org/llama.cpp:server"


def test_secret_reads_only_where_listed(render: Callable[..., list[dict[str, Any]]]) -> None:
    docs = render({"rbac": {"secretNamespaces": ["ml"]}})
    (role,) = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith("-gateway")]
    assert (role["metadata"]["namespace"], rules_of(role)) == ("ml", {("", "secrets", "get")})
    assert not rules_of(one(docs, "ClusterRole", "kd-kubedistill")) & FORBIDDEN
    assert not [d for d in render({"rbac": {"create": False}}) if d["kind"].endswith(("Role", "RoleBinding"))]


# ----------------------------------------------------------------------------------- uninstall hook


def test_the_uninstall_hook_stops_the_operator_then_releases_the_finalizers(
    render_all: Callable[..., list[dict[str, Any]]],
) -> None:
    docs = render_all(VALUE_SETS["namespaced-minio"])
    hooks = [d for d in docs if is_uninstall_hook(d)]
    assert {d["kind"] for d in hooks} == {"Role", "RoleBinding", "Job"}
    for doc in hooks:
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-delete"
        # Nothing of the hook outlives it, whether it worked or not.
        policy = set(annotations["helm.sh/hook-delete-policy"].split(","))
        assert {"hook-succeeded", "hook-failed"} <= policy
        assert doc["metadata"]["namespace"] == NAMESPACE
    role = one(hooks, "Role")
    assert rules_of(role) == {
        ("apps", "deployments", "get"),
        ("apps", "deployments/scale", "patch"),
        ("", "pods", "list"),
    }
    deployment = one(docs, "Deployment", "kd-kubedistill")["metadata"]["name"]
    scaled = [r for r in role["rules"] if r["apiGroups"] == ["apps"]]
    assert all(r["resourceNames"] == [deployment] for r in scaled)
    # It runs as the operator's ServiceAccount, which may already list and patch the jobs.
    assert one(hooks, "RoleBinding")["subjects"][0]["name"] == one(docs, "ServiceAccount")["metadata"]["name"]
    job = one(hooks, "Job")
    order = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks}
    assert order["Role"] < order["Job"] and order["RoleBinding"] < order["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["command"] == [
        "kubedistill",
        "doctor",
        f"--stop-operator={NAMESPACE}/{deployment}",
        "--release-finalizers",
        "--delete-artifacts",
        "--namespace=ml",
        "--namespace=research",
    ]
    # The operator's settings and S3 access, to find and delete artifacts as the operator would.
    operator = one(docs, "Deployment", "kd-kubedistill")["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == operator["envFrom"] and container["env"] == operator["env"]
    assert container["image"] == operator["image"]
    # The hook's pods are not the operator's: waiting for those to go must not wait for itself.
    selector = one(docs, "Deployment", "kd-kubedistill")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_the_uninstall_hook_can_be_turned_off(render_all: Callable[..., list[dict[str, Any]]]) -> None:
    assert not [d for d in render_all({"uninstallHook": {"enabled": False}}) if is_uninstall_hook(d)]
    (job,) = [d for d in render_all({"uninstallHook": {"deleteArtifacts": False}}) if d["kind"] == "Job"]
    assert "--delete-artifacts" not in job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--namespace" not in " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])


# -------------------------------------------------------------------------------------------- CRDs


def ours(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kubedistill.io CRDs (kopf's peering CRDs come from the chart's crds/ directory regardless)."""
    return [d for d in by_kind(docs, "CustomResourceDefinition") if d["spec"]["group"] == "kubedistill.io"]


def test_chart_crds_equal_the_generated_crds(render: Callable[..., list[dict[str, Any]]]) -> None:
    rendered = {d["metadata"]["name"]: d for d in ours(render({}))}
    sources = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]
    assert len(sources) == 2 and set(rendered) == {s["metadata"]["name"] for s in sources}
    for source in sources:
        chart_crd = rendered[source["metadata"]["name"]]
        assert chart_crd["spec"] == source["spec"]
        assert source["metadata"]["labels"].items() <= chart_crd["metadata"]["labels"].items()
        assert chart_crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    result = subprocess.run(
        [sys.executable, str(CHART / "hack" / "sync-crds.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_crds_enabled_and_keep_switches(render: Callable[..., list[dict[str, Any]]]) -> None:
    assert not ours(render({"crds": {"enabled": False, "keep": True}}))
    assert len(by_kind(render({"crds": {"enabled": False, "keep": True}}), "CustomResourceDefinition")) == 2
    unkept = ours(render({"crds": {"enabled": True, "keep": False}}))
    assert len(unkept) == 2 and all("annotations" not in d["metadata"] for d in unkept)


# ------------------------------------------------------------------------------------------ schema

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicaCount": 0}, "at '/replicaCount': minimum: got 0, want 1"),
    ({"replicaCount": "two"}, "at '/replicaCount'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
    ({"image": {"tag": "latest please"}}, "at '/image/tag'"),
    ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0': 'Team_A' does not match pattern"),
    ({"watchNamespaces": ["ml", "ml"]}, "at '/watchNamespaces'"),
    ({"crds": {"enabled": "yes", "keep": True}}, "at '/crds/enabled'"),
    ({"stages": {"train": {"gpus": -1}}}, "at '/stages/train/gpus': minimum: got -1, want 0"),
    ({"stages": {"train": {"gpu": 1}}}, "additional properties 'gpu' not allowed"),
    (
        {"stages": {"export": {"resources": {"limits": {"memory": "lots"}}}}},
        "at '/stages/export/resources/limits/memory'",
    ),
    (
        {"gpu": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]}},
        "at '/gpu/tolerations/0/operator'",
    ),
    ({"storage": {"endpoint": "minio:9000"}}, "at '/storage/endpoint'"),
    ({"storage": {"bucket": "My_Bucket"}}, "at '/storage/bucket'"),
    ({"storage": {"artifactRoot": "/data/artifacts"}}, "at '/storage/artifactRoot'"),
    ({"minio": {"rootPassword": "short"}}, "at '/minio/rootPassword'"),
    ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "at '/metrics/serviceMonitor/interval'"),
    (
        {"metrics": {"prometheusRule": {"stageFailureRatio": 1.5}}},
        "at '/metrics/prometheusRule/stageFailureRatio'",
    ),
    ({"metrics": {"port": 70000}}, "at '/metrics/port'"),
    (
        {"trainer": {"env": {"HF-HOME": "/tmp"}}},
        "at '/trainer/env': additional properties 'HF-HOME' not allowed",
    ),
    ({"watchNamespace": ["ml"]}, "additional properties 'watchNamespace' not allowed"),
    ({"kueue": {"queueName": "gpu queue"}}, "at '/kueue/queueName'"),
    # Rules a JSON schema cannot say, enforced by the templates with a message of their own.
    ({"metrics": {"port": 8080}}, "metrics.port and healthPort must differ"),
    (
        {"operator": {"retryBackoffBaseSeconds": 60, "retryBackoffMaxSeconds": 30}},
        "retryBackoffMaxSeconds must be at least",
    ),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[m.split(":")[0][:40] for _, m in BAD_VALUES])
def test_bad_values_are_refused_with_a_clear_message(
    values: dict[str, Any], message: str, tmp_path: Path
) -> None:
    helm.build()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm.run(["template", "kd", str(CHART), "--values", str(path)], check=False)
    assert result.returncode != 0, f"accepted: {values}"
    assert message in result.stderr, result.stderr


def test_the_gitops_example_values_are_valid(render: Callable[..., list[dict[str, Any]]]) -> None:
    app = yaml.safe_load((ROOT / "examples" / "gitops" / "apps" / "operator.yaml").read_text())
    docs = render(app["spec"]["source"]["helm"]["valuesObject"])
    assert from_mapping(settings_of(docs)).storage_secret == "kubedistill-s3"
    assert by_kind(docs, "ServiceMonitor")


# ------------------------------------------------------------------------------------------ README


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("chart_gen_readme", CHART / "hack" / "gen-readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_gen_readme"] = module
    spec.loader.exec_module(module)
    return module


def leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_readme_is_generated_from_values() -> None:
    generator = load_generator()
    assert (CHART / "README.md").read_text() == generator.render(), (
        "run python charts/kubedistill/hack/gen-readme.py"
    )
    documented = {path for path, _ in generator.documented_keys((CHART / "values.yaml").read_text())}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    undocumented = [
        leaf
        for leaf in leaves(values)
        if not any(leaf == path or leaf.startswith(path + ".") for path in documented)
    ]
    assert undocumented == [], "values without a `# --` comment"


def test_every_value_is_allowed_by_the_schema() -> None:
    """values.yaml itself passes values.schema.json, and the schema knows every key of values.yaml."""
    import json

    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


def test_the_documented_alerts_are_the_charts() -> None:
    """docs/observability.md shows the PrometheusRule the chart installs with its default thresholds,
    for a release named like the README's `helm install kubedistill ...`."""
    text = (ROOT / "docs" / "observability.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    documented = {r["alert"]: r for r in yaml.safe_load(block)["groups"][0]["rules"]}
    helm.build()
    docs = helm.template({"metrics": {"prometheusRule": {"enabled": True}}}, release="kubedistill")
    installed = {r["alert"]: r for r in one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert set(documented) == set(installed)
    for name, rule in installed.items():
        assert " ".join(documented[name]["expr"].split()) == " ".join(rule["expr"].split()), name
        assert documented[name].get("for") == rule.get("for"), name
        assert documented[name]["labels"] == rule["labels"], name
