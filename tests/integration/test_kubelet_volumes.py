"""The local kubelet's volumes on the real control plane: an emptyDir is one directory that a Pod's init
containers and containers share, at the path they mount it at (paths under a mount in env, args and
workingDir point at it), and it goes when the Pod is deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import wait_for
from kubedistill_testing.kubelet import LocalKubelet

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
    wait_for(lambda: not volume.exists(), 10, what="the emptyDir to be removed")
    assert not (kubelet.root / "pods" / uid).exists()


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
