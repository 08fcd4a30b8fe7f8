"""Shared fixtures: a real control plane on loopback, the local kubelet, and a fresh namespace per test.

- ``control_plane`` (session): path of a kubeconfig. Starts etcd + kube-apiserver + kube-controller-manager
  (``kubedistill_testing.cluster``), or uses ``KUBEDISTILL_TEST_KUBECONFIG`` when that names an existing
  cluster (kind, k3d). The project's CRDs (``crds/*.yaml``) are installed once.
- ``k8s_api`` (session): a ``kubernetes.client.ApiClient`` for that cluster, as cluster admin.
- ``kubelet`` (session): a started ``LocalKubelet``; skips on an existing cluster, whose own nodes run Pods.
- ``namespace`` (function): a new namespace whose default ServiceAccount exists; deleted afterwards.
- ``serving_images`` (session): the local kubelet runs the real llama-server and LiteLLM proxy for their
  upstream images (``kubedistill_testing.servers``: built once per machine, by the bootstrap).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubedistill_testing import cluster, paths, servers
from kubedistill_testing.kubelet import LocalKubelet

# The serving tests' fixtures (tests/serve_fixtures.py): a conftest of their own in tests/e2e would
# shadow this module for `from conftest import ...`.
pytest_plugins = ["serve_fixtures"]

REPO = Path(__file__).resolve().parents[1]
# The harness is installed apart from the repository: tell it where the chart, CRDs and Go module are.
os.environ.setdefault(paths.ENV, str(REPO))
WAIT_S = 30.0


def wait_for(predicate: Any, timeout: float = WAIT_S, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll until `predicate()` returns something truthy, and return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _crd_established(ext: client.ApiextensionsV1Api, name: str) -> bool:
    crd = ext.read_custom_resource_definition(name)
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


def install_crds(api: client.ApiClient, paths: list[Path]) -> list[str]:
    """Create (or update) every CRD in these files and wait until each is served."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            name = doc["metadata"]["name"]
            try:
                ext.create_custom_resource_definition(doc)
            except ApiException as err:
                if err.status != 409:
                    raise
                doc["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(
                    name
                ).metadata.resource_version
                ext.replace_custom_resource_definition(name, doc)
            names.append(name)
    for name in names:
        wait_for(lambda name=name: _crd_established(ext, name), what=f"CRD {name} to be established")
    return names


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    existing = os.environ.get("KUBEDISTILL_TEST_KUBECONFIG")
    plane = None
    if existing:
        kubeconfig = Path(existing)
    else:
        try:
            plane = cluster.up(tmp_path_factory.mktemp("controlplane"))
        except cluster.ClusterError as err:
            pytest.fail(f"test control plane: {err}", pytrace=False)
        kubeconfig = plane.kubeconfig
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        with api:
            install_crds(api, sorted((REPO / "crds").glob("*.yaml")))
        yield kubeconfig
    finally:
        if plane is not None:
            plane.stop()


@pytest.fixture(scope="session")
def k8s_api(control_plane: Path) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(control_plane))
    with api:
        yield api


@pytest.fixture(scope="session")
def kubelet(control_plane: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKubelet]:
    if os.environ.get("KUBEDISTILL_TEST_KUBECONFIG"):
        pytest.skip("KUBEDISTILL_TEST_KUBECONFIG names a real cluster: its own nodes run the Pods")
    # Restart back-off starts at 1 s and stops doubling at 4 s (a node: 10 s and 300 s).
    root = tmp_path_factory.mktemp("kubelet")
    with LocalKubelet.from_kubeconfig(control_plane, root, backoff_base_s=1.0, backoff_max_s=4.0) as running:
        yield running


@pytest.fixture(scope="session")
def serving_images(kubelet: LocalKubelet) -> None:
    try:
        servers.build_llama_server()
        servers.build_litellm()
    except servers.ServerBuildError as err:
        pytest.fail(f"model servers: {err}", pytrace=False)
    kubelet.images.update(servers.server_images())


@pytest.fixture
def namespace(k8s_api: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(k8s_api)
    name = f"kd-test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})

    def default_account() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    # Pods are refused until the serviceaccount controller has made the namespace's default account.
    wait_for(default_account, what=f"serviceaccount {name}/default")
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as err:
        if err.status != 404:
            raise
