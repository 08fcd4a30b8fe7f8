"""Two teams on one operator, on the real test control plane (docs/multi-team.md).

team-a has a storage scope by name, team-b by label, team-c none (and the default scope is not
allowed). The chart's ValidatingAdmissionPolicy, its bindings and parameter ConfigMaps, and its team
ClusterRole are rendered by helm and applied as they are:
- the API server itself refuses each escape (another team's dataset or GGUF, file://, a foreign image,
  an unscoped namespace) with the field named;
- with the bindings removed, the operator (run with the chart's rendered settings) refuses the same
  objects with a PolicyViolation condition, starts no stage Job and opens no connection to the store;
- each team's stage Jobs get that team's storage Secret and no other;
- SubjectAccessReviews of the team role: jobs and aliases yes, Secrets' values and Pods no.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from sdk_cli_support import job_body
from test_helm import delete

from conftest import wait_for
from kubedistill_testing import helm

pytestmark = pytest.mark.cluster

GROUP, VERSION = "kubedistill.io", "v1alpha1"
RELEASE, RELEASE_NS = "kd", "kd-tenancy-system"
TEAM_LABEL = "kubedistill.io/team"
LABEL_JOB = "kubedistill.io/job"
POLICY_KINDS = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


@dataclass
class Tenancy:
    custom: client.CustomObjectsApi
    core: client.CoreV1Api
    batch: client.BatchV1Api
    dyn: DynamicClient
    docs: list[dict[str, Any]]
    store: socket.socket  # the storage endpoint: any connection to it is a read the operator made

    def doc(self, kind: str, name: str) -> dict[str, Any]:
        return next(d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name)

    def apply(self, doc: dict[str, Any]) -> None:
        resource = self.dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        resource.server_side_apply(
            body=doc,
            name=doc["metadata"]["name"],
            namespace=doc["metadata"].get("namespace"),
            field_manager="kubedistill-tests",
            force_conflicts=True,
        )

    def create(self, namespace: str, body: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        plural = "distillationjobs" if body["kind"] == "DistillationJob" else "modelaliases"
        kwargs = {"dry_run": "All"} if dry_run else {}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, body, **kwargs
        )
        return created

    def refusal(self, namespace: str, body: dict[str, Any]) -> str | None:
        """The API server's message when it refuses `body` (dry run), None when it would admit it."""
        try:
            self.create(namespace, body, dry_run=True)
        except ApiException as err:
            assert err.status in (400, 403, 422), err.body
            return str(err.body)
        return None


def _values(endpoint: str) -> dict[str, Any]:
    return {
        "watchNamespaces": ["team-a", "team-b", "team-c"],
        "storage": {
            "bucket": "shared",
            "existingSecret": "s3-shared",
            "endpoint": endpoint,
            "sharedReadURIs": ["s3://models-cache/"],
            "scopes": [
                {"namespace": "team-a", "bucket": "teams", "prefix": "a", "secret": "s3-team-a"},
                {
                    "namespaceSelector": {"matchLabels": {TEAM_LABEL: "b"}},
                    "bucket": "teams",
                    "prefix": "b",
                    "secret": "s3-team-b",
                },
            ],
        },
    }


@pytest.fixture(scope="module")
def tenancy(k8s_api: client.ApiClient) -> Iterator[Tenancy]:
    core = client.CoreV1Api(k8s_api)
    store = socket.socket()
    store.bind(("127.0.0.1", 0))
    store.listen(16)
    store.setblocking(False)
    docs = helm.template(
        _values(f"http://127.0.0.1:{store.getsockname()[1]}"), release=RELEASE, namespace=RELEASE_NS
    )
    labels = {"team-a": {}, "team-b": {TEAM_LABEL: "b"}, "team-c": {}, RELEASE_NS: {}}
    for name, extra in labels.items():
        core.create_namespace({"metadata": {"name": name, "labels": extra}})
    for name in ("team-a", "team-b", "team-c"):
        wait_for(lambda n=name: _has_default_account(core, n), what=f"serviceaccount {name}/default")
    running = Tenancy(
        client.CustomObjectsApi(k8s_api),
        core,
        client.BatchV1Api(k8s_api),
        DynamicClient(k8s_api),
        docs,
        store,
    )
    policy = [
        d
        for d in docs
        if d["kind"] in POLICY_KINDS
        or (d["kind"] == "ConfigMap" and "-scope-" in d["metadata"]["name"])
        or (d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-team"))
    ]
    for doc in sorted(policy, key=lambda d: d["kind"] != "ConfigMap"):
        running.apply(doc)
    # The API server picks up a new policy and binding within a moment: wait until it enforces them.
    _wait_enforced(running, True)
    yield running
    store.close()
    for doc in policy:
        if doc["kind"] != "ConfigMap":
            delete(running.dyn, doc)
    # The policy is cluster-wide and its default binding refuses every namespace without a scope: the
    # tests after this module share the API server, so wait until it has stopped enforcing it.
    _wait_enforced(running, False)
    for name in labels:
        core.delete_namespace(name)


def _wait_enforced(tenancy: Tenancy, enforced: bool) -> None:
    """The API server picks up bindings within a moment: wait until each one is (or is no longer) in force."""
    probes = [
        ("team-a", "s3://teams/b/p.jsonl"),
        ("team-b", "s3://teams/a/p.jsonl"),
        ("team-c", "s3://x/p.jsonl"),
    ]
    for namespace, uri in probes:
        body = job_body("probe", dataset={"uri": uri})
        wait_for(
            lambda n=namespace, b=body: (tenancy.refusal(n, b) is not None) == enforced,
            what=f"the admission policy {'in force' if enforced else 'gone'} in {namespace}",
        )


def _has_default_account(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def _alias(name: str, **target: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelAlias",
        "metadata": {"name": name},
        "spec": {"target": {"baseModel": "qwen3-0.6b", **target}},
    }


# (namespace, object, the field the refusal must name)
ESCAPES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    (
        "team-a",
        lambda: job_body("other-dataset", dataset={"uri": "s3://teams/b/prompts.jsonl"}),
        "spec.dataset.uri",
    ),
    (
        "team-a",
        lambda: _alias("other-gguf", ggufURI="s3://teams/b/team-b/j/u/export/m.gguf"),
        "spec.target.ggufURI",
    ),
    ("team-a", lambda: job_body("local-file", dataset={"uri": "file:///etc/passwd"}), "spec.dataset.uri"),
    (
        "team-a",
        lambda: job_body("foreign-image", resources={"train": {"image": "evil.example/trainer:1"}}),
        "spec.resources.train.image",
    ),
    ("team-a", lambda: job_body("other-bucket", storage={"bucket": "shared"}), "spec.storage.bucket"),
    (
        "team-a",
        lambda: {
            **_alias("own-server"),
            "spec": {**_alias("x")["spec"], "server": {"image": "evil.example/l:1"}},
        },
        "spec.server.image",
    ),
    (
        "team-a",
        lambda: {
            **_alias("other-canary"),
            "spec": {**_alias("x")["spec"], "canary": {"ggufURI": "s3://teams/b/m.gguf", "weight": 20}},
        },
        "spec.canary.ggufURI",
    ),
    (
        "team-b",
        lambda: job_body("b-reads-a", dataset={"uri": "s3://teams/a/prompts.jsonl"}),
        "spec.dataset.uri",
    ),
    ("team-c", lambda: job_body("unscoped"), "metadata.namespace"),
]


def test_the_api_server_refuses_every_escape_and_names_the_field(tenancy: Tenancy) -> None:
    for namespace, body, field in ESCAPES:
        message = tenancy.refusal(namespace, body())
        assert message is not None and f"{field}: " in message, (namespace, field, message)
    # What lies in each scope, or in the shared read-only prefix, is admitted.
    assert tenancy.refusal("team-a", job_body("ok", dataset={"uri": "s3://teams/a/prompts.jsonl"})) is None
    assert tenancy.refusal("team-b", job_body("ok", student={"model": "s3://models-cache/qwen3/"})) is None
    assert tenancy.refusal("team-a", _alias("ok", ggufURI="s3://teams/a/team-a/j/u/export/m.gguf")) is None
    image = {"export": {"image": "ghcr.io/kubedistill/trainer:0.1.0-cu128"}}
    assert tenancy.refusal("team-a", job_body("ok", resources=image)) is None


@pytest.fixture(scope="module")
def operator(
    tenancy: Tenancy, control_plane: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The operator with the chart's rendered settings, watching the three teams, admin credentials."""
    settings = tenancy.doc("ConfigMap", f"{RELEASE}-kubedistill-settings")["data"]
    log = tmp_path_factory.mktemp("tenancy") / "operator.log"
    env = {
        **os.environ,
        **settings,
        "KUBECONFIG": str(control_plane),
        "KUBEDISTILL_RETRY_BACKOFF_BASE_S": "0.5",
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kubedistill.handlers", "-n", "team-a", "-n", "team-b", "-n", "team-c"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield log
    process.terminate()
    process.wait(timeout=15)


def _ready(tenancy: Tenancy, namespace: str, body: dict[str, Any]) -> dict[str, Any] | None:
    plural = "distillationjobs" if body["kind"] == "DistillationJob" else "modelaliases"
    found = tenancy.custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, body["metadata"]["name"]
    )
    conditions = (found.get("status") or {}).get("conditions") or []
    ready: dict[str, Any] | None = next((c for c in conditions if c["type"] == "Ready"), None)
    return ready


def test_without_the_policy_the_operator_refuses_and_reads_nothing(tenancy: Tenancy, operator: Path) -> None:
    bindings = [d for d in tenancy.docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    for doc in bindings:
        delete(tenancy.dyn, doc)
    _wait_enforced(tenancy, False)
    try:
        created = [(namespace, body(), field) for namespace, body, field in ESCAPES]
        for namespace, obj, _ in created:
            tenancy.create(namespace, obj)
        for namespace, obj, field in created:
            ready = wait_for(
                lambda n=namespace, b=obj: (
                    (r := _ready(tenancy, n, b)) and r["reason"] == "PolicyViolation" and r
                ),
                what=f"{namespace}: PolicyViolation naming {field}",
            )
            assert ready["status"] == "False" and f"{field}: " in ready["message"], ready
        for namespace in ("team-a", "team-b", "team-c"):
            assert tenancy.batch.list_namespaced_job(namespace, label_selector=LABEL_JOB).items == []
        with pytest.raises(BlockingIOError):  # nobody connected to the storage endpoint
            tenancy.store.accept()
    finally:
        for doc in bindings:
            tenancy.apply(doc)


def test_each_team_s_stage_pods_get_only_its_own_secret(tenancy: Tenancy, operator: Path) -> None:
    keys = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    for namespace, secret, prefix in (("team-a", "s3-team-a", "a"), ("team-b", "s3-team-b", "b")):
        tenancy.core.create_namespaced_secret(namespace, {"metadata": {"name": secret}, "stringData": keys})
        tenancy.create(namespace, job_body("in-scope", dataset={"uri": f"s3://teams/{prefix}/prompts.jsonl"}))
        jobs = wait_for(
            lambda n=namespace: tenancy.batch.list_namespaced_job(n, label_selector=LABEL_JOB).items,
            what=f"a stage Job in {namespace}",
        )
        (container,) = jobs[0].spec.template.spec.containers
        refs = {e.value_from.secret_key_ref.name for e in container.env if e.value_from is not None}
        assert refs == {secret}
        invocation = next(e.value for e in container.env if e.name == "KUBEDISTILL_JOB")
        assert f'"artifactBase":"s3://teams/{prefix}/{namespace}/in-scope/' in invocation


def _allowed(tenancy: Tenancy, user: str, namespace: str, verb: str, resource: str, group: str = "") -> bool:
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            resource_attributes=client.V1ResourceAttributes(
                namespace=namespace, verb=verb, resource=resource, group=group
            ),
        )
    )
    answer = client.AuthorizationV1Api(tenancy.custom.api_client).create_subject_access_review(review)
    return bool(answer.status.allowed)


def test_the_team_role_creates_jobs_and_aliases_but_reads_no_secret(tenancy: Tenancy) -> None:
    role = tenancy.doc("ClusterRole", f"{RELEASE}-kubedistill-team")["metadata"]["name"]
    binding = {
        "metadata": {"name": "team-a-members"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}],
    }
    client.RbacAuthorizationV1Api(tenancy.custom.api_client).create_namespaced_role_binding("team-a", binding)
    wait_for(
        lambda: _allowed(tenancy, "alice", "team-a", "create", "distillationjobs", GROUP), what="the binding"
    )
    assert _allowed(tenancy, "alice", "team-a", "create", "modelaliases", GROUP)
    assert _allowed(tenancy, "alice", "team-a", "get", "jobs", "batch")
    assert _allowed(tenancy, "alice", "team-a", "create", "secrets")  # the teacher's API key
    for verb in ("get", "list", "watch", "update", "delete"):
        assert not _allowed(tenancy, "alice", "team-a", verb, "secrets"), verb
    assert not _allowed(tenancy, "alice", "team-a", "create", "pods")  # a Pod could mount the Secret
    assert not _allowed(tenancy, "alice", "team-b", "create", "distillationjobs", GROUP)
    # Nor can a team widen its own scope: the parameters and bindings are out of its reach.
    assert not _allowed(tenancy, "alice", RELEASE_NS, "update", "configmaps")
    assert not _allowed(
        tenancy, "alice", "", "update", "validatingadmissionpolicybindings", "admissionregistration.k8s.io"
    )
