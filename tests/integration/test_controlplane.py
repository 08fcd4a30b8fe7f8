"""The test control plane is a real one: CEL and schema validation, status isolation, optimistic
concurrency, the Job controller with the local kubelet, garbage collection and TTL — and it cleans up."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import install_crds, wait_for
from kubedistill_testing import cluster
from kubedistill_testing.kubelet import LocalKubelet

GROUP, VERSION, PLURAL = "test.kubedistill.io", "v1", "widgets"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["minReplicas", "maxReplicas"],
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                    }
                                ],
                            },
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
            }
        ],
    },
}


def widget(name: str, minimum: Any, maximum: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"minReplicas": minimum, "maxReplicas": maximum},
    }


def python_job(name: str, script: str, *, backoff_limit: int = 0, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff_limit,
            **spec,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "main", "image": "python:3.11", "command": ["python", "-c", script]}
                    ],
                }
            },
        },
    }


def job_condition(batch: client.BatchV1Api, name: str, namespace: str) -> str | None:
    job = batch.read_namespaced_job(name, namespace)
    done = [
        c.type for c in job.status.conditions or [] if c.status == "True" and c.type in ("Complete", "Failed")
    ]
    return done[0] if done else None


def job_pods(core: client.CoreV1Api, name: str, namespace: str) -> list[client.V1Pod]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items)


def gone(read: Any, *args: Any) -> bool:
    try:
        read(*args)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def alive(pid: int) -> bool:
    """True if the pid runs and is not a zombie (a zombie has already let go of everything)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.fixture(scope="module")
def widgets(
    k8s_api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[client.CustomObjectsApi]:
    path = tmp_path_factory.mktemp("crd") / "widgets.yaml"
    path.write_text(yaml.safe_dump(WIDGET_CRD))
    install_crds(k8s_api, [path])
    yield client.CustomObjectsApi(k8s_api)
    client.ApiextensionsV1Api(k8s_api).delete_custom_resource_definition(WIDGET_CRD["metadata"]["name"])


# ---------------------------------------------------------------------------------------------------
# API server semantics
# ---------------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_cel_rule_rejects_with_its_message(widgets: client.CustomObjectsApi, namespace: str) -> None:
    with pytest.raises(ApiException) as caught:
        widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("bad", 5, 1))
    assert caught.value.status == 422
    assert "minReplicas must not exceed maxReplicas" in caught.value.body


@pytest.mark.cluster
def test_schema_violation_is_rejected(widgets: client.CustomObjectsApi, namespace: str) -> None:
    with pytest.raises(ApiException) as caught:
        widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("bad", "three", 4))
    assert caught.value.status == 422
    assert "spec.minReplicas" in caught.value.body
    assert "must be of type integer" in caught.value.body


@pytest.mark.cluster
def test_status_update_does_not_change_spec(widgets: client.CustomObjectsApi, namespace: str) -> None:
    created = widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w", 1, 2))
    changed = {**created, "spec": {"minReplicas": 0, "maxReplicas": 9}, "status": {"phase": "Ready"}}

    updated = widgets.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "w", changed)

    assert updated["status"] == {"phase": "Ready"}
    assert updated["spec"] == {"minReplicas": 1, "maxReplicas": 2}
    assert updated["metadata"]["generation"] == created["metadata"]["generation"]


@pytest.mark.cluster
def test_stale_resource_version_gets_409(widgets: client.CustomObjectsApi, namespace: str) -> None:
    stale = widgets.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w", 1, 2))
    patch = {"spec": {"maxReplicas": 3}}
    widgets.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "w", patch, _content_type="application/merge-patch+json"
    )
    stale["spec"]["maxReplicas"] = 4

    with pytest.raises(ApiException) as caught:
        widgets.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w", stale)

    assert caught.value.status == 409


# ---------------------------------------------------------------------------------------------------
# Jobs through the local kubelet
# ---------------------------------------------------------------------------------------------------

REPORTING_SCRIPT = """
import os
print("hello from", os.environ["POD_NAME"], os.environ["TOKEN"], os.environ["MODEL"], flush=True)
with open(os.environ["KUBEDISTILL_TERMINATION_LOG"], "w") as f:
    f.write('{"stage": "done"}')
"""


@pytest.mark.cluster
def test_job_runs_to_complete(k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "teacher"}, "stringData": {"token": "s3cret"}}
    )
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"model": "tiny"}}
    )
    job = python_job("ok", REPORTING_SCRIPT)
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "teacher", "key": "token"}}},
        {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "model"}}},
    ]
    batch.create_namespaced_job(namespace, job)

    assert wait_for(lambda: job_condition(batch, "ok", namespace), what="job ok to finish") == "Complete"

    (pod,) = job_pods(core, "ok", namespace)
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (0, "Completed")
    assert json.loads(terminated.message) == {"stage": "done"}
    assert terminated.started_at <= terminated.finished_at
    log = kubelet.log_path(namespace, pod.metadata.name, "main").read_text()
    assert f"hello from {pod.metadata.name} s3cret tiny" in log


@pytest.mark.cluster
def test_failing_job_fails_after_backoff_limit_plus_one_pods(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    script = "import sys; print('boom', file=sys.stderr); sys.exit(3)"
    # The Job controller waits 10 s before the first retry: backoffLimit 1 keeps this test short.
    batch.create_namespaced_job(namespace, python_job("bad", script, backoff_limit=1))

    assert wait_for(lambda: job_condition(batch, "bad", namespace), 60, what="job bad to fail") == "Failed"

    pods = job_pods(core, "bad", namespace)
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Failed"
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert batch.read_namespaced_job("bad", namespace).status.failed == 2


@pytest.mark.cluster
def test_garbage_collector_deletes_owned_job(k8s_api: client.ApiClient, namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    job = python_job("owned", "pass", suspend=True)
    job["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    ]
    batch.create_namespaced_job(namespace, job)

    core.delete_namespaced_config_map("owner", namespace)

    wait_for(lambda: gone(batch.read_namespaced_job, "owned", namespace), what="owned job to be collected")


@pytest.mark.cluster
def test_ttl_after_finished_removes_job(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    batch = client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(namespace, python_job("short", "pass", ttlSecondsAfterFinished=0))

    wait_for(lambda: gone(batch.read_namespaced_job, "short", namespace), what="finished job to be removed")


# ---------------------------------------------------------------------------------------------------
# The local kubelet
# ---------------------------------------------------------------------------------------------------


def sleeper(name: str, **container: Any) -> dict[str, Any]:
    main = {
        "name": "main",
        "image": "python:3.11",
        "command": ["python", "-c", "import time; time.sleep(600)"],
    }
    return {
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{**main, **container}]},
    }


def running_pid(core: client.CoreV1Api, name: str, namespace: str) -> int | None:
    pod = core.read_namespaced_pod(name, namespace)
    statuses = pod.status.container_statuses or []
    if pod.status.phase != "Running" or not statuses or not statuses[0].state.running:
        return None
    return int(statuses[0].container_id.removeprefix("local://"))


@pytest.mark.cluster
def test_gpu_pod_the_node_lacks_stays_pending(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(namespace, sleeper("gpu", resources={"limits": {"nvidia.com/gpu": "1"}}))

    def unschedulable() -> Any:
        pod = core.read_namespaced_pod("gpu", namespace)
        return next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)

    condition = wait_for(unschedulable, what="PodScheduled condition")
    assert (condition.status, condition.reason) == ("False", "Unschedulable")
    assert condition.message == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    pod = core.read_namespaced_pod("gpu", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


@pytest.mark.cluster
def test_deleting_a_pod_kills_its_process(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(namespace, sleeper("sleepy"))
    pid = wait_for(lambda: running_pid(core, "sleepy", namespace), what="pod sleepy to run")
    assert alive(pid)

    core.delete_namespaced_pod("sleepy", namespace)

    wait_for(lambda: gone(core.read_namespaced_pod, "sleepy", namespace), what="pod sleepy to be removed")
    wait_for(lambda: not alive(pid), 5, what=f"process {pid} to exit")


SELF_REVIEW_SCRIPT = """
import json, os, ssl, urllib.request
sa = os.environ["KUBEDISTILL_SERVICEACCOUNT_DIR"]
url = "https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
token = open(os.path.join(sa, "token")).read()
body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
request = urllib.request.Request(url, body, {"Authorization": "Bearer " + token, "Content-Type": "application/json"})
context = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt"))
review = json.load(urllib.request.urlopen(request, context=context))
namespace = open(os.path.join(sa, "namespace")).read()
with open(os.environ["KUBEDISTILL_TERMINATION_LOG"], "w") as f:
    f.write(review["status"]["userInfo"]["username"] + " " + namespace)
"""


@pytest.mark.cluster
def test_pod_talks_to_the_api_as_its_service_account(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "stage"}})
    pod = {
        "metadata": {"name": "whoami"},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "stage",
            "containers": [
                {"name": "main", "image": "python:3.11", "command": ["python", "-c", SELF_REVIEW_SCRIPT]}
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    def finished() -> Any:
        status = core.read_namespaced_pod("whoami", namespace).status
        return status if status.phase in ("Succeeded", "Failed") else None

    status = wait_for(finished, what="pod whoami to finish")
    assert status.phase == "Succeeded", kubelet.log_path(namespace, "whoami", "main").read_text()
    message = status.container_statuses[0].state.terminated.message
    assert message == f"system:serviceaccount:{namespace}:stage {namespace}"


@pytest.mark.cluster
def test_image_without_command_runs_its_mapped_entrypoint(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = client.CoreV1Api(k8s_api)
    monkeypatch.setitem(
        kubelet.images, "example.test/echo", [sys.executable, "-c", "import sys; print(sys.argv[1:])"]
    )
    pod = {
        "metadata": {"name": "mapped"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "example.test/echo:1.0", "args": ["generate", "--shard=$(SHARD)"],
                            "env": [{"name": "SHARD", "value": "3"}]}],
        },
    }  # fmt: skip
    core.create_namespaced_pod(namespace, pod)

    wait_for(
        lambda: core.read_namespaced_pod("mapped", namespace).status.phase == "Succeeded", what="pod mapped"
    )
    assert kubelet.log_path(namespace, "mapped", "main").read_text() == "['generate', '--shard=3']\n"


RETRY_SCRIPT = """
import os, sys
marker = os.path.join(os.path.dirname(os.environ["KUBEDISTILL_TERMINATION_LOG"]), "tried")
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(1)
"""


@pytest.mark.cluster
def test_on_failure_restarts_the_container_in_place(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    pod = sleeper("retry", command=["python", "-c", RETRY_SCRIPT])
    pod["spec"]["restartPolicy"] = "OnFailure"
    core.create_namespaced_pod(namespace, pod)

    wait_for(
        lambda: core.read_namespaced_pod("retry", namespace).status.phase == "Succeeded", what="pod retry"
    )
    (status,) = core.read_namespaced_pod("retry", namespace).status.container_statuses
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 1
    assert status.state.terminated.exit_code == 0


@pytest.mark.cluster
def test_deployment_becomes_available(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    apps = client.AppsV1Api(k8s_api)
    labels = {"app": "web"}
    deployment = {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": sleeper("unused")["spec"] | {"restartPolicy": "Always"},
            },
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)

    wait_for(
        lambda: apps.read_namespaced_deployment("web", namespace).status.available_replicas == 1, what="web"
    )


# ---------------------------------------------------------------------------------------------------
# up / down: ready in time, busy ports, nothing left behind
# ---------------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_up_on_busy_port_is_fast_and_down_leaves_no_process(tmp_path: Path, control_plane: Path) -> None:
    if os.environ.get("KUBEDISTILL_TEST_KUBECONFIG"):
        pytest.skip("uses the built control plane binaries")
    command = [sys.executable, "-m", "kubedistill_testing.cluster"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run(
            [*command, "up", "--dir", str(tmp_path), "--apiserver-port", str(busy_port)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    try:
        kubeconfig = Path(out.stdout.strip())
        server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        assert server.startswith("https://127.0.0.1:") and not server.endswith(f":{busy_port}")
        assert elapsed <= 30, f"up took {elapsed:.1f}s"
        recorded = cluster.read_processes(tmp_path)
        assert {p.name for p in recorded} == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert all(alive(p.pid) for p in recorded)

        # Use it: run a Pod through a kubelet of its own, then stop the kubelet with the Pod still running.
        with LocalKubelet.from_kubeconfig(kubeconfig, tmp_path / "kubelet", node_name="second") as second:
            api = second.api
            core = client.CoreV1Api(api)
            core.create_namespaced_pod("default", sleeper("left-running"))
            pid = wait_for(lambda: running_pid(core, "left-running", "default"), 60, what="pod to run")
        assert not alive(pid)
        assert second.container_pids() == []
    finally:
        subprocess.run(
            [*command, "down", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
        )

    leftover = [p for p in recorded if alive(p.pid)]
    assert leftover == []
    assert [p for p in _processes_under(tmp_path)] == []


def _processes_under(directory: Path) -> list[int]:
    """Pids whose command line mentions this directory: anything `up` started and `down` missed."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(directory) in cmdline and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line
# ---------------------------------------------------------------------------------------------------


def test_missing_go_toolchain_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBEDISTILL_CACHE", str(tmp_path))  # nothing cached: a build is needed
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("GO", raising=False)
    monkeypatch.setattr(cluster, "GO_FALLBACKS", ())

    assert cluster.main(["build"]) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Go toolchain was not found" in err and "https://go.dev/dl/" in err


def test_refused_module_names_module_and_version(tmp_path: Path) -> None:
    stderr = (
        "go: downloading k8s.io/kubernetes v1.37.2\n"
        "go: k8s.io/kubernetes@v1.37.2: reading https://proxy.golang.org/k8s.io/kubernetes/@v/v1.37.2.zip: "
        "403 Forbidden\n"
    )
    line = cluster.go_failure_line(stderr, tmp_path / "build.log")
    assert "k8s.io/kubernetes v1.37.2" in line and "403 Forbidden" in line and "\n" not in line


def test_proxy_off_names_the_module_being_downloaded(tmp_path: Path) -> None:
    stderr = "go: downloading go.etcd.io/etcd/server/v3 v3.7.0\ncmd/etcd/main.go:14:2: module lookup disabled by GOPROXY=off\n"
    line = cluster.go_failure_line(stderr, tmp_path / "build.log")
    assert "go.etcd.io/etcd/server/v3 v3.7.0" in line and "GOPROXY=off" in line


def test_compile_error_points_at_the_log(tmp_path: Path) -> None:
    line = cluster.go_failure_line("./main.go:3:1: syntax error\n", tmp_path / "build.log")
    assert (
        line
        == f"go build of the control plane failed: ./main.go:3:1: syntax error (full log: {tmp_path / 'build.log'})"
    )


def test_cache_directory_follows_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEDISTILL_CACHE", str(tmp_path))
    go_mod = (cluster.tools_module_dir() / "go.mod").read_text()
    assert cluster.binaries_dir(cluster.pinned_version(go_mod)) == tmp_path / "controlplane-v1.37.2"
    assert cluster.pinned_version("require (\n\tk8s.io/kubernetes v1.38.0\n)\n") == "v1.38.0"


def test_stale_pid_is_never_signalled(tmp_path: Path) -> None:
    # A recorded pid whose start time differs is someone else's process now (pid reuse).
    me = cluster.Recorded("me", os.getpid(), (cluster.proc_start_time(os.getpid()) or 0) + 1)
    (tmp_path / "processes.json").write_text(json.dumps([me.__dict__]))
    assert cluster.down(tmp_path) == []
    assert alive(os.getpid())
