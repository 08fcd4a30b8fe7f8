"""The local kubelet's volumes and names on the real control plane: an emptyDir is one directory that a
Pod's init containers and containers share, at the path they mount it at (paths under a mount in env,
args and workingDir point at it), and it goes when the Pod is deleted; a Pod resolves Services and the
named Pods of headless Services through its own /etc/hosts, as through cluster DNS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import wait_for
from kubedistill_testing.kubelet import LocalKubelet, loopback_address
from kubedistill_testing.kubelet.addresses import service_loopback_address

pytestmark = pytest.mark.cluster

WRITE_ARG = "import sys; open(sys.argv[1], 'w').write('from init')"
READ_ARG = (
    "import os, sys; print(open(sys.argv[1]).read(), os.path.samefile(os.getcwd(), os.environ['SCRATCH']), "
    "os.path.samefile(os.environ['TMPDIR'], os.environ['SCRATCH']))"
)


def finished_pod(core: client.CoreV1Api, name: str, namespace: str) -> Any:
    pod = core.read_namespaced_pod(name, namespace)
    return pod if pod.status.phase in ("Succeeded", "Failed") else None


def gone(core: client.CoreV1Api, name: str, namespace: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def test_an_empty_dir_is_shared_by_init_and_main_containers_and_removed_with_the_pod(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    mount = [{"name": "scratch", "mountPath": "/tmp"}]
    init = {"name": "seed", "image": "python:3.11", "command": ["python", "-c", WRITE_ARG, "/tmp/seed"],
            "volumeMounts": mount}  # fmt: skip
    main = {"name": "main", "image": "python:3.11", "command": ["python", "-c", READ_ARG],
            "args": ["$(SCRATCH)/seed"], "workingDir": "/tmp", "volumeMounts": mount,
            "env": [{"name": "SCRATCH", "value": "/tmp"}]}  # fmt: skip
    body = {"metadata": {"name": "shared"},
            "spec": {"restartPolicy": "Never", "initContainers": [init], "containers": [main],
                     "volumes": [{"name": "scratch", "emptyDir": {}}]}}  # fmt: skip
    uid = core.create_namespaced_pod(namespace, body).metadata.uid

    pod = wait_for(lambda: finished_pod(core, "shared", namespace), 60, what="the pod to finish")
    log = kubelet.log_path(namespace, "shared", "main").read_text()
    assert pod.status.phase == "Succeeded", log
    # What the init container wrote, read through $(SCRATCH) in args; cwd and TMPDIR are the same emptyDir.
    assert log == "from init True True\n"
    volume = kubelet.root / "pods" / uid / "volumes" / "scratch"
    assert (volume / "seed").read_text() == "from init"  # kept while the Pod exists, as on a node

    core.delete_namespaced_pod("shared", namespace)
    wait_for(lambda: gone(core, "shared", namespace), 30, what="the pod to go")
    wait_for(lambda: not (kubelet.root / "pods" / uid).exists(), 10, what="the emptyDir to be removed")


def test_each_pod_gets_its_own_empty_dir(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    write = "import os, sys; print(os.path.exists(sys.argv[1])); open(sys.argv[1], 'w').write('x')"
    for name in ("first", "second"):
        container = {"name": "main", "image": "python:3.11", "command": ["python", "-c", write, "/tmp/mine"],
                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}  # fmt: skip
        body = {"metadata": {"name": name},
                "spec": {"restartPolicy": "Never", "containers": [container],
                         "volumes": [{"name": "tmp", "emptyDir": {}}]}}  # fmt: skip
        core.create_namespaced_pod(namespace, body)
        pod = wait_for(lambda n=name: finished_pod(core, n, namespace), 60, what=name)
        assert pod.status.phase == "Succeeded"
        # Neither sees a file the other wrote: two Pods, two directories.
        assert kubelet.log_path(namespace, name, "main").read_text() == "False\n"
    assert not Path("/tmp/mine").exists()


SERVER = """
import os, socket
server = socket.create_server((os.environ["POD_IP"], 8080))
while True:
    conn, _ = server.accept()
    conn.sendall(b"hello from worker-0")
    conn.close()
"""
CLIENT = """
import socket, sys, time
def resolve(name, wait):
    deadline = time.monotonic() + wait
    while True:
        try:
            return socket.gethostbyname(name)
        except OSError:
            if time.monotonic() > deadline:
                return "unresolved"
            time.sleep(0.2)
peer = resolve("worker-0.ring", 60)
with socket.create_connection((peer, 8080), timeout=10) as conn:
    greeting = conn.recv(100).decode()
print(peer, greeting, resolve("api", 5), resolve(sys.argv[1], 5), resolve("late", 60), flush=True)
"""


def test_pods_resolve_a_headless_services_pod_and_service_names_as_cluster_dns_would(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    if kubelet.namespace_problem:
        pytest.skip(f"no private mount namespace for Pods here: {kubelet.namespace_problem}")
    core = client.CoreV1Api(k8s_api)

    def create_service(name: str, **spec: Any) -> str:
        body = {"metadata": {"name": name},
                "spec": {"selector": {"app": "ring"}, "ports": [{"port": 8080}], **spec}}  # fmt: skip
        return str(core.create_namespaced_service(namespace, body).spec.cluster_ip)

    create_service("ring", clusterIP="None")
    api_ip = create_service("api")
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    server = {"name": "main", "image": "python:3.11", "command": ["python", "-c", SERVER], "env": [pod_ip],
              "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}  # fmt: skip
    core.create_namespaced_pod(namespace, {
        "metadata": {"name": "worker-0", "labels": {"app": "ring"}},
        "spec": {"hostname": "worker-0", "subdomain": "ring", "containers": [server]},
    })  # fmt: skip
    qualified = f"api.{namespace}.svc.cluster.local"
    asker = {"name": "main", "image": "python:3.11", "command": ["python", "-c", CLIENT, qualified]}
    core.create_namespaced_pod(
        namespace, {"metadata": {"name": "asker"}, "spec": {"restartPolicy": "Never", "containers": [asker]}}
    )
    wait_for(lambda: core.read_namespaced_pod("asker", namespace).status.phase == "Running", 30, what="asker")
    # A Service made while the Pod runs: its hosts file is rewritten in place, as DNS would answer.
    late_ip = create_service("late")

    pod = wait_for(lambda: finished_pod(core, "asker", namespace), 90, what="the asker to finish")
    log = kubelet.log_path(namespace, "asker", "main").read_text()
    assert pod.status.phase == "Succeeded", log
    peer = loopback_address(core.read_namespaced_pod("worker-0", namespace).status.pod_ip)
    api, late = service_loopback_address(api_ip), service_loopback_address(late_ip)
    assert log == f"{peer} hello from worker-0 {api} {api} {late}\n"
    assert "worker-0.ring" not in Path("/etc/hosts").read_text()  # the node's own file is untouched
