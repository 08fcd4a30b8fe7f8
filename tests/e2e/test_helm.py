"""The chart against the real test control plane.

- Every rendered manifest of the three tested value sets passes a server-side dry run.
- `helm install` (namespaced) runs the operator as a Pod of the local kubelet, which maps the operator
  image to the operator's own command, starts it with the environment of operator/Dockerfile's ENV
  lines, and gives it the chart's ServiceAccount token, not admin; that
  operator drives a DistillationJob with instant fake stages to Succeeded and promotes its alias, which
  proves the RBAC is enough. Its metrics and liveness endpoints answer while it runs.
- SubjectAccessReviews against the chart's RBAC prove it is not more than that.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from sdk_cli_support import job_body

from conftest import wait_for
from kubedistill.api.models import STAGES
from kubedistill.domain.deletion import FINALIZER
from kubedistill_testing import argocd, helm
from kubedistill_testing.cluster import free_port
from kubedistill_testing.helm import VALUE_SETS
from kubedistill_testing.image_env import dockerfile_env, image_environment
from kubedistill_testing.kubelet import LocalKubelet

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_IMAGE = "ghcr.io/kubedistill/operator"
FAKE_STAGE_IMAGE = "kubedistill.test/helm-fake-stage"
# No prometheus-operator in the test control plane: these kinds cannot be dry-run here.
NOT_SERVED = {"ServiceMonitor", "PrometheusRule"}

# A real kubelet mounts the token at /var/run/secrets/kubernetes.io/serviceaccount; the local kubelet
# cannot, and names its directory instead. This turns that directory into the kubeconfig an in-cluster
# client would build, written where the Pod may write (its /tmp emptyDir: the root filesystem is read-only).
POD_KUBECONFIG = """
import os, sys, pathlib, tempfile, yaml
sa = pathlib.Path(os.environ["KUBEDISTILL_SERVICEACCOUNT_DIR"])
server = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
kubeconfig = {
    "apiVersion": "v1", "kind": "Config", "current-context": "pod",
    "clusters": [{"name": "pod", "cluster": {"server": server, "certificate-authority": str(sa / "ca.crt")}}],
    "users": [{"name": "pod", "user": {"tokenFile": str(sa / "token")}}],
    "contexts": [{"name": "pod", "context": {"cluster": "pod", "user": "pod"}}],
}
written = pathlib.Path(tempfile.mkdtemp(prefix="kubeconfig-")) / "kubeconfig"
written.write_text(yaml.safe_dump(kubeconfig))
os.environ["KUBECONFIG"] = str(written)
"""
# The operator, started exactly as the image's ENTRYPOINT does.
IN_POD = (
    POD_KUBECONFIG
    + """
import asyncio
from kubedistill.k8s.client import Kube

async def whoami():
    # Who the operator's own API client is, with this kubeconfig.
    kube = Kube.from_env()
    try:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        return await kube.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body=body)
    finally:
        await kube.close()

review = asyncio.run(whoami())
print("operator identity:", review["status"]["userInfo"]["username"], flush=True)
from kubedistill.handlers.main import main
main(sys.argv[1:])
"""
)
# The image's `kubedistill` command (the uninstall hook's); KUBERNETES_SERVICE_HOST would send the CLI to
# the in-cluster files a real kubelet mounts.
KUBEDISTILL_COMMAND = (
    POD_KUBECONFIG
    + """
del os.environ["KUBERNETES_SERVICE_HOST"]
from kubedistill.cli import main
main()
"""
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def apply(dyn: DynamicClient, doc: dict[str, Any], *, dry_run: bool) -> None:
    """Server-side apply, as `kubectl apply --server-side [--dry-run=server]` does."""
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    kwargs: dict[str, Any] = {"field_manager": "kubedistill-tests", "force_conflicts": True}
    if dry_run:
        kwargs["dry_run"] = "All"
    dyn.server_side_apply(
        resource, body=doc, name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"), **kwargs
    )


def delete(dyn: DynamicClient, doc: dict[str, Any]) -> None:
    resource = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    try:
        resource.delete(name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"))
    except ApiException as err:
        if err.status != 404:
            raise


@pytest.fixture
def dyn(k8s_api: client.ApiClient) -> DynamicClient:
    return DynamicClient(k8s_api)


@pytest.fixture
def extra_namespaces(k8s_api: client.ApiClient) -> Iterator[list[str]]:
    core = client.CoreV1Api(k8s_api)
    names = [unique("kd-helm-a"), unique("kd-helm-b")]
    for name in names:
        core.create_namespace({"metadata": {"name": name}})
    yield names
    for name in names:
        core.delete_namespace(name)


def kube_version() -> str:
    from kubedistill_testing.cluster import pinned_version, tools_module_dir

    return pinned_version((tools_module_dir() / "go.mod").read_text()).lstrip("v")


# ------------------------------------------------------------------------------------ dry run


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_manifests_pass_a_server_side_dry_run(
    name: str, namespace: str, extra_namespaces: list[str], dyn: DynamicClient
) -> None:
    values = dict(VALUE_SETS[name])
    if "watchNamespaces" in values:
        values["watchNamespaces"] = extra_namespaces  # namespaces that exist in this cluster
    helm.build()
    docs = helm.template(
        values, release=unique("kd"), namespace=namespace, kube_version=kube_version(), include_crds=True
    )
    # kopf's peering CRDs (the chart's crds/) must really exist before a peering object can be dry-run.
    peering_crds = [
        d for d in docs if d["kind"] == "CustomResourceDefinition" and d["spec"]["group"] == "kopf.dev"
    ]
    needs_peering = any(d["kind"] in ("KopfPeering", "ClusterKopfPeering") for d in docs)
    if needs_peering:
        for crd in peering_crds:
            apply(dyn, crd, dry_run=False)
        for crd in peering_crds:
            wait_for(lambda crd=crd: served(dyn, crd), what=f"CRD {crd['metadata']['name']}")
    checked = []
    for doc in docs:
        if doc["kind"] in NOT_SERVED:
            continue
        try:
            apply(dyn, doc, dry_run=True)
        except ApiException as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.status} {err.reason}: {err.body}")
        checked.append(doc["kind"])
    assert {"Deployment", "ClusterRole", "ConfigMap", "CustomResourceDefinition"} <= set(checked)


def test_helm_install_dry_run_with_minio_tells_how_to_share_the_s3_secret(
    control_plane: Path, namespace: str, extra_namespaces: list[str], tmp_path: Path
) -> None:
    values = {**VALUE_SETS["namespaced-minio"], "watchNamespaces": extra_namespaces[:1]}
    values["crds"] = {"enabled": False, "keep": True}  # installed for the whole session, by another owner
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm.build()
    release = unique("kd")
    kube = ["--kubeconfig", str(control_plane), "--namespace", namespace]
    install = ["install", release, str(helm.chart_dir()), *kube, "--dry-run=server", "--skip-crds"]
    result = helm.run([*install, "--values", str(values_file)])
    notes = result.stdout.split("NOTES:", 1)[1]
    secret = f"{release}-kubedistill-minio"
    assert f"kubectl -n {extra_namespaces[0]} create secret generic {secret}" in notes
    assert (
        f"kubectl -n {namespace} get secret {secret} -o jsonpath='{{.data.AWS_SECRET_ACCESS_KEY}}'" in notes
    )
    assert "WARNING" not in notes
    # With a storage scope per namespace, no namespace gets a copy of the operator's Secret.
    scoped = {
        **values,
        "storage": {"scopes": [{"namespace": extra_namespaces[0], "bucket": "teams", "secret": "s3"}]},
    }
    values_file.write_text(yaml.safe_dump(scoped))
    notes = helm.run([*install, "--values", str(values_file)]).stdout.split("NOTES:", 1)[1]
    assert f"create secret generic {secret}" not in notes and "docs/multi-team.md" in notes
    assert f"--clusterrole={release}-kubedistill-team" in notes


def served(dyn: DynamicClient, crd: dict[str, Any]) -> bool:
    found = dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition").get(
        name=crd["metadata"]["name"]
    )
    return any(c["type"] == "Established" and c["status"] == "True" for c in found.status.conditions or [])


# ---------------------------------------------------------------------------------------- RBAC


def subject_access(
    k8s_api: client.ApiClient, account: str, namespace: str | None, verb: str, group: str, resource: str
) -> bool:
    service_account_ns, name = account.split(":")
    review = client.AuthorizationV1Api(k8s_api).create_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:{service_account_ns}:{name}",
                # The groups a real token of this account carries, so default bindings count too.
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{service_account_ns}",
                    "system:authenticated",
                ],
                "resourceAttributes": {
                    "namespace": namespace or "",
                    "verb": verb,
                    "group": group,
                    "resource": resource.split("/")[0],
                    "subresource": resource.split("/")[1] if "/" in resource else "",
                },
            },
        }
    )
    allowed: bool = review.status.allowed
    return allowed


NEVER = [
    # (verb, group, resource): nothing the operator does needs these, in any namespace.
    ("get", "", "secrets"),
    ("list", "", "secrets"),
    ("watch", "", "secrets"),
    ("create", "", "secrets"),
    ("patch", "", "nodes"),
    ("delete", "", "nodes"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ("patch", "rbac.authorization.k8s.io", "clusterroles"),
    ("escalate", "rbac.authorization.k8s.io", "roles"),
    ("bind", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "", "pods"),
    ("create", "", "pods/exec"),
    ("create", "", "serviceaccounts/token"),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions"),
    ("delete", "", "namespaces"),
]
NEEDED = [
    ("watch", "kubedistill.io", "distillationjobs"),
    ("patch", "kubedistill.io", "distillationjobs/status"),
    ("create", "kubedistill.io", "modelaliases"),
    ("create", "batch", "jobs"),
    ("delete", "batch", "jobs"),
    ("list", "", "pods"),
    ("create", "", "configmaps"),
    ("create", "", "services"),
    ("create", "", "events"),
    # Model servers of the aliases it serves (the gateway is on by default), applied server-side.
    ("patch", "apps", "deployments"),
]


@pytest.fixture
def installed_rbac(
    namespace: str, extra_namespaces: list[str], dyn: DynamicClient, request: pytest.FixtureRequest
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The chart's RBAC objects, really created, for the value set the test is parametrised with."""
    values: dict[str, Any] = request.param
    if values.get("watchNamespaces"):
        values = {**values, "watchNamespaces": extra_namespaces[:1]}
    release = unique("kd")
    helm.build()
    docs = [
        d
        for d in helm.template(values, release=release, namespace=namespace)
        if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
        # The uninstall hook's Role exists only while the hook runs (tests/unit/test_chart.py checks it).
        and (d["metadata"].get("annotations") or {}).get("helm.sh/hook") != "pre-delete"
    ]
    try:
        for doc in docs:
            apply(dyn, doc, dry_run=False)
        yield f"{namespace}:{release}-kubedistill", values
    finally:
        for doc in docs:
            delete(dyn, doc)


@pytest.mark.parametrize(
    "installed_rbac",
    [{}, {"watchNamespaces": ["set-by-fixture"]}],
    indirect=True,
    ids=["cluster-wide", "namespaced"],
)
def test_rbac_allows_what_the_operator_does_and_nothing_more(
    installed_rbac: tuple[str, dict[str, Any]],
    namespace: str,
    extra_namespaces: list[str],
    k8s_api: client.ApiClient,
) -> None:
    account, values = installed_rbac
    watched = values.get("watchNamespaces") or []
    elsewhere = extra_namespaces[1]  # never watched, never listed for Secrets
    job_namespaces = watched or [elsewhere]
    for ns in job_namespaces:
        for verb, group, resource in NEEDED:
            # The RBAC authorizer learns of new bindings through a watch: allow it a moment, once.
            wait_for(
                lambda ns=ns, verb=verb, group=group, resource=resource: subject_access(
                    k8s_api, account, ns, verb, group, resource
                ),
                timeout=10,
                what=f"{verb} {resource} in {ns} to be allowed",
            )
    # The gateway's keys Secret lives in the release namespace; creating it cannot be limited by name.
    gateway_keys = ("create", "", "secrets")
    for ns in [elsewhere, namespace, None]:
        for verb, group, resource in NEVER:
            if ns == namespace and (verb, group, resource) == gateway_keys:
                continue
            assert not subject_access(k8s_api, account, ns, verb, group, resource), (
                f"{verb} {resource} in {ns}"
            )
    if watched:
        # Namespaced: nothing at all about jobs outside the listed namespaces, Secret existence checks inside.
        assert not subject_access(k8s_api, account, elsewhere, "create", "batch", "jobs")
        assert not subject_access(k8s_api, account, None, "watch", "kubedistill.io", "distillationjobs")
        wait_for(
            lambda: subject_access(k8s_api, account, watched[0], "get", "", "secrets"),
            timeout=10,
            what="get secrets in the watched namespace to be allowed",
        )
        for verb, group, resource in [v for v in NEVER if v != ("get", "", "secrets")]:
            assert not subject_access(k8s_api, account, watched[0], verb, group, resource), (
                f"{verb} {resource}"
            )


# ----------------------------------------------------------------------------------- install


def job(name: str) -> dict[str, Any]:
    teacher = {"model": "openai/gpt-4o-mini", "apiKeySecretRef": {"name": "teacher", "key": "api-key"}}
    return job_body(name, teacher=teacher, promotion={"alias": "smart"})


Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(port: int) -> dict[Sample, float]:
    """The kubedistill_* samples of a /metrics page, keyed by name and label set (label order varies)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[Sample, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(kubedistill_\w+)(?:\{(.*)\})?\s+(\S+)$", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def pod_commands(kubelet: LocalKubelet, tmp_path: Path) -> LocalKubelet:
    """The operator image (any tag), its `kubedistill` command and the fake stage, in the local kubelet."""
    kubelet.images[OPERATOR_IMAGE] = [sys.executable, "-c", IN_POD]
    kubelet.images[FAKE_STAGE_IMAGE] = [sys.executable, "-m", "kubedistill_testing.fake_stage"]
    command = tmp_path / "kubedistill"
    command.write_text(f"#!{sys.executable}\n{KUBEDISTILL_COMMAND}")
    command.chmod(0o755)
    kubelet.commands["kubedistill"] = str(command)
    return kubelet


@pytest.fixture
def operator_image_env(kubelet: LocalKubelet) -> Iterator[None]:
    """Pods start from the operator image's ENV lines (operator/Dockerfile), not this shell's environment."""
    env = dockerfile_env(
        (ROOT / "operator" / "Dockerfile").read_text(),
        base={"PATH": os.environ["PATH"]},  # the base image's PATH
        filesystem={"/opt/venv": sys.prefix},  # the image's virtualenv: this interpreter's
    )
    with image_environment(kubelet, env):
        yield


@pytest.mark.parametrize("cluster_wide", [False, True], ids=["namespaced", "cluster-wide"])
@pytest.mark.usefixtures("operator_image_env")
def test_helm_install_runs_a_job_to_succeeded_with_the_charts_rbac(
    cluster_wide: bool,
    control_plane: Path,
    pod_commands: LocalKubelet,
    namespace: str,
    k8s_api: client.ApiClient,
    tmp_path: Path,
) -> None:
    """Cluster-wide, the operator may not read Secrets at all: its existence check of the teacher's
    Secret is refused (403) and must not stop the job; namespaced, it checks with its Role."""
    kubelet = pod_commands
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "teacher"}, "stringData": {"api-key": "sk-test"}}
    )
    release, metrics_port, health_port = unique("kd"), free_port(), free_port()
    values = {
        "watchNamespaces": [] if cluster_wide else [namespace],
        # The CRDs are already installed for the whole test session; kopf's peering CRDs are not needed.
        "crds": {"enabled": False, "keep": True},
        "image": {"repository": OPERATOR_IMAGE, "tag": "e2e", "pullPolicy": "Never"},
        "trainer": {"image": {"repository": FAKE_STAGE_IMAGE, "tag": "1", "pullPolicy": "Never"}},
        "stages": {"train": {"gpus": 0}},
        "storage": {"artifactRoot": (tmp_path / "artifacts").as_uri()},
        "operator": {"progressIntervalSeconds": 1, "retryBackoffBaseSeconds": 1},
        "healthPort": health_port,
        "metrics": {"port": metrics_port},
        # The fake stages export no servable GGUF: the promoted alias is checked as resolved here, and
        # served through the gateway in test_serve.py.
        "gateway": {"enabled": False},
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    kube = ["--kubeconfig", str(control_plane), "--namespace", namespace]
    helm.build()
    installed = helm.run(
        ["install", release, str(helm.chart_dir()), *kube, "--skip-crds", "--values", str(values_file)]
    )
    log: Path | None = None
    try:
        # NOTES.txt tells the next three commands, with this release's names in them.
        notes = installed.stdout
        assert f"rollout status deployment/{release}-kubedistill" in notes
        jobs_namespace = "default" if cluster_wide else namespace
        assert f"kubectl -n {jobs_namespace} get distillationjobs -w" in notes
        # What uninstall does to running jobs and the kept CRDs, said before anyone runs it.
        assert "`helm uninstall` keeps the CRDs, so every DistillationJob and ModelAlias stays" in notes
        assert "pre-delete hook first stops the operator" in notes

        def operator_pod() -> dict[str, Any] | None:
            pods = core.list_namespaced_pod(
                namespace, label_selector="app.kubernetes.io/component=operator"
            ).items
            running = [p for p in pods if p.status.phase == "Running"]
            return k8s_api.sanitize_for_serialization(running[0]) if running else None

        pod = wait_for(operator_pod, timeout=60, what="the operator Pod to run")
        log = kubelet.log_path(namespace, pod["metadata"]["name"], "operator")
        assert pod["spec"]["serviceAccountName"] == f"{release}-kubedistill"
        wait_for(lambda: healthy(health_port), timeout=60, what="kopf's liveness endpoint")

        custom.create_namespaced_custom_object(
            "kubedistill.io", "v1alpha1", namespace, "distillationjobs", job("helm-e2e")
        )

        def phase() -> str | None:
            got = custom.get_namespaced_custom_object(
                "kubedistill.io", "v1alpha1", namespace, "distillationjobs", "helm-e2e"
            )
            value: str | None = (got.get("status") or {}).get("phase")
            return value if value in ("Succeeded", "Failed") else None

        assert wait_for(phase, timeout=180, what="the DistillationJob to finish") == "Succeeded"

        def alias_ready() -> bool:
            got = custom.get_namespaced_custom_object(
                "kubedistill.io", "v1alpha1", namespace, "modelaliases", "smart"
            )
            conditions = (got.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for(alias_ready, timeout=60, what="the promoted ModelAlias to be Ready")
        # Argo CD's health checks read the operator's real status the way they were written to.
        finished = custom.get_namespaced_custom_object(
            "kubedistill.io", "v1alpha1", namespace, "distillationjobs", "helm-e2e"
        )
        alias = custom.get_namespaced_custom_object(
            "kubedistill.io", "v1alpha1", namespace, "modelaliases", "smart"
        )
        assert argocd.health(finished)[0] == "Healthy"
        assert argocd.health(alias)[0] == "Healthy"
        # The teacher's Secret was checked with exactly the access the chart gives: none cluster-wide.
        account = f"{namespace}:{release}-kubedistill"
        assert subject_access(k8s_api, account, namespace, "get", "", "secrets") is not cluster_wide

        # The metrics endpoint the chart exposes answers with what just happened. Cluster-wide, the
        # operator also meets what earlier tests left in namespaces being deleted: counts not only ours.
        exactly: Callable[[float, float], bool] = operator.ge if cluster_wide else operator.eq
        samples = scrape(metrics_port)
        assert total(samples, "kubedistill_jobs", namespace=namespace, phase="Succeeded") == 1
        assert total(samples, "kubedistill_stage_attempts_total") >= 5
        assert total(samples, "kubedistill_stage_duration_seconds_count", outcome="succeeded") >= 5
        assert total(samples, "kubedistill_time_to_first_job_seconds_count") >= 1
        assert exactly(total(samples, "kubedistill_reconcile_errors_total"), 0)
        reported = finished["status"]["metrics"]
        teacher = "openai/gpt-4o-mini"
        assert reported["teacherInputTokens"] > 0
        tokens = total(samples, "kubedistill_teacher_tokens_total", teacher=teacher, direction="input")
        assert exactly(tokens, reported["teacherInputTokens"])
        cost = total(samples, "kubedistill_teacher_cost_usd_total", teacher=teacher)
        assert exactly(round(cost, 6), round(reported["teacherCostTotal"], 6))
        # Everything above ran with the ServiceAccount's token, and no request of it was refused.
        text = log.read_text(errors="replace")
        assert f"operator identity: system:serviceaccount:{namespace}:{release}-kubedistill" in text
        refused = [
            ln for ln in text.splitlines() if "forbidden" in ln.lower() or "Not enough permissions" in ln
        ]
        # (A namespace being deleted refuses new objects with a 403 too: only lines about others may say so.)
        assert [ln for ln in refused if namespace in ln or not re.search(r"kd-(test|helm)-\w+", ln)] == []
    finally:
        if log is not None and log.exists():
            print(f"operator log:\n{log.read_text(errors='replace')[-6000:]}")  # shown when the test fails
        helm.run(["uninstall", release, *kube, "--wait", "--timeout", "60s"], check=False)
        assert not any(
            b.metadata.name == f"{release}-kubedistill"
            for b in client.RbacAuthorizationV1Api(k8s_api).list_cluster_role_binding().items
        )


# ------------------------------------------------------------------------------ upgrade, uninstall


def lifecycle_values(tmp_path: Path, watch: list[str], stage_env: dict[str, str]) -> dict[str, Any]:
    """A namespaced install whose fake stages take their time (KUBEDISTILL_FAKE_SLEEP)."""
    return {
        "watchNamespaces": watch,
        "crds": {"enabled": False, "keep": True},
        "image": {"repository": OPERATOR_IMAGE, "tag": "e2e", "pullPolicy": "Never"},
        "trainer": {
            "image": {"repository": FAKE_STAGE_IMAGE, "tag": "1", "pullPolicy": "Never"},
            "env": stage_env,
        },
        "stages": {"train": {"gpus": 0}},
        "storage": {"artifactRoot": (tmp_path / "artifacts").as_uri()},
        "operator": {"progressIntervalSeconds": 1, "retryBackoffBaseSeconds": 1},
        "healthPort": free_port(),
        "metrics": {"port": free_port()},
        # The fake stages' GGUF is no model: serving it is tests/e2e/test_serve.py's, with a real one.
        "gateway": {"enabled": False},
    }


def helm_values(tmp_path: Path, values: dict[str, Any]) -> list[str]:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--values", str(path)]


def operator_pods(core: client.CoreV1Api, namespace: str) -> list[Any]:
    return list(
        core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=operator").items
    )


def dj(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = custom.get_namespaced_custom_object(
            "kubedistill.io", "v1alpha1", namespace, "distillationjobs", name
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    return found


def phase_of(custom: client.CustomObjectsApi, namespace: str, name: str) -> str | None:
    return ((dj(custom, namespace, name) or {}).get("status") or {}).get("phase")


def test_helm_upgrade_of_the_operator_mid_stage_runs_no_stage_twice(
    control_plane: Path, pod_commands: LocalKubelet, namespace: str, k8s_api: client.ApiClient, tmp_path: Path
) -> None:
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    batch = client.BatchV1Api(k8s_api)
    release = unique("kd")
    values = lifecycle_values(tmp_path, [namespace], {"KUBEDISTILL_FAKE_SLEEP": "train:15"})
    kube = ["--kubeconfig", str(control_plane), "--namespace", namespace]
    chart = [release, str(helm.chart_dir()), *kube, "--skip-crds"]
    helm.build()
    helm.run(["install", *chart, *helm_values(tmp_path, values)])
    try:
        wait_for(
            lambda: [p for p in operator_pods(core, namespace) if p.status.phase == "Running"], timeout=60
        )
        custom.create_namespaced_custom_object(
            "kubedistill.io", "v1alpha1", namespace, "distillationjobs", job_body("rolling")
        )
        wait_for(
            lambda: phase_of(custom, namespace, "rolling") == "Training", timeout=90, what="train to run"
        )

        values["image"]["tag"] = "e2e-2"
        helm.run(["upgrade", *chart, *helm_values(tmp_path, values)])

        def upgraded() -> Any:
            pods = operator_pods(core, namespace)
            images = [p.spec.containers[0].image for p in pods]
            running = [p for p in pods if p.status.phase == "Running"]
            return running[0] if images == [f"{OPERATOR_IMAGE}:e2e-2"] and running else None

        new_pod = wait_for(upgraded, timeout=60, what="the upgraded operator Pod to run alone")
        wait_for(
            lambda: phase_of(custom, namespace, "rolling") in ("Succeeded", "Failed"),
            timeout=120,
            what="the job to finish under the new operator",
        )
        done = dj(custom, namespace, "rolling")
        assert done is not None and done["status"]["phase"] == "Succeeded", done
        assert [s["attempts"] for s in done["status"]["stages"]] == [1] * len(STAGES)
        jobs = batch.list_namespaced_job(namespace, label_selector="kubedistill.io/job=rolling").items
        assert sorted(j.metadata.name for j in jobs) == sorted(f"rolling-{s.value}-1" for s in STAGES)
        # The new operator came up while the train stage ran, and took it over.
        train = next(j for j in jobs if j.metadata.name == "rolling-train-1")
        assert train.status.start_time <= new_pod.status.start_time <= train.status.completion_time
    finally:
        helm.run(["uninstall", release, *kube, "--wait", "--timeout", "60s"], check=False)


def test_helm_uninstall_leaves_no_job_or_namespace_stuck(
    control_plane: Path, pod_commands: LocalKubelet, namespace: str, k8s_api: client.ApiClient, tmp_path: Path
) -> None:
    """Both jobs mid-stage at uninstall: afterwards each deletes in seconds, and so does their namespace.
    The one that asked for its artifacts to go with it is told they stay, and where."""
    core, custom = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    jobs_ns = unique("kd-helm-jobs")
    core.create_namespace({"metadata": {"name": jobs_ns}})
    release = unique("kd")
    values = lifecycle_values(tmp_path, [jobs_ns], {"KUBEDISTILL_FAKE_SLEEP": "generate:120"})
    kube = ["--kubeconfig", str(control_plane), "--namespace", namespace]
    helm.build()
    try:
        wait_for(
            lambda: core.list_namespaced_service_account(jobs_ns).items, what="the default ServiceAccount"
        )
        helm.run(
            ["install", release, str(helm.chart_dir()), *kube, "--skip-crds", *helm_values(tmp_path, values)]
        )
        wait_for(
            lambda: [p for p in operator_pods(core, namespace) if p.status.phase == "Running"], timeout=60
        )
        cleans = {"deleteOnJobDeletion": True}
        for body in (job_body("cleaning", storage=cleans), job_body("plain")):
            custom.create_namespaced_custom_object(
                "kubedistill.io", "v1alpha1", jobs_ns, "distillationjobs", body
            )
        for name in ("cleaning", "plain"):
            wait_for(lambda name=name: phase_of(custom, jobs_ns, name) == "Generating", timeout=90, what=name)
        assert (dj(custom, jobs_ns, "cleaning") or {})["metadata"].get("finalizers") == [FINALIZER]
        assert not (dj(custom, jobs_ns, "plain") or {})["metadata"].get("finalizers")
        uid = (dj(custom, jobs_ns, "cleaning") or {})["metadata"]["uid"]

        helm.run(["uninstall", release, *kube, "--wait", "--timeout", "120s"])

        logs = pod_commands.root / "logs" / namespace
        (hook_log,) = [p / "release-finalizers.log" for p in logs.glob(f"{release}-kubedistill-uninstall-*")]
        said = hook_log.read_text()
        where = f"{(tmp_path / 'artifacts').as_uri()}/{jobs_ns}/cleaning/{uid}"
        assert (
            f"released distillationjob {jobs_ns}/cleaning — LEFT BEHIND: artifacts at {where} will stay"
            in said
        )
        assert f"released distillationjob {jobs_ns}/plain" not in said  # it never had the finalizer
        events = core.list_namespaced_event(jobs_ns).items
        left = [e for e in events if e.reason == "ArtifactsLeftBehind"]
        assert [e.involved_object.name for e in left] == ["cleaning"] and where in left[0].message
        # Nothing of the release is left, the hook's own objects included.
        assert not operator_pods(core, namespace)
        assert not [
            r
            for r in client.RbacAuthorizationV1Api(k8s_api).list_namespaced_role(namespace).items
            if r.metadata.name.startswith(release)
        ]
        assert not client.BatchV1Api(k8s_api).list_namespaced_job(namespace).items

        for name in ("cleaning", "plain"):
            custom.delete_namespaced_custom_object(
                "kubedistill.io", "v1alpha1", jobs_ns, "distillationjobs", name
            )
            wait_for(
                lambda name=name: dj(custom, jobs_ns, name) is None, timeout=5, what=f"{name} to be deleted"
            )
        core.delete_namespace(jobs_ns)

        def namespace_gone() -> bool:
            try:
                core.read_namespace(jobs_ns)
            except ApiException as err:
                if err.status == 404:
                    return True
                raise
            return False

        wait_for(namespace_gone, timeout=60, what=f"namespace {jobs_ns} to be deleted")
    finally:
        helm.run(["uninstall", release, *kube, "--wait", "--timeout", "60s"], check=False)
        with contextlib.suppress(ApiException):
            core.delete_namespace(jobs_ns)


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback() -> Iterator[None]:
    # urllib would send loopback scrapes through an HTTP(S)_PROXY set in the environment.
    saved = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = ",".join(filter(None, [saved, "127.0.0.1", "localhost"]))
    yield
    if saved is None:
        os.environ.pop("NO_PROXY", None)
    else:
        os.environ["NO_PROXY"] = saved
