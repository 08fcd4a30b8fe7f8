"""The operator process (kopf) with serving on, against the real API server (no kubelet): an alias gets its
model server and the gateway; the Deployment watch registered at startup reacts (a deleted model server
comes back); deleting the alias takes its route out of the gateway's config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import wait_for
from kubedistill.api.models import API_VERSION, GROUP, VERSION
from kubedistill.builders import gateway as gw
from kubedistill.settings import GATEWAY_NAME
from kubedistill_testing.operator_process import OperatorProcess
from serve_support import serve_operator

pytestmark = pytest.mark.cluster


@pytest.fixture
def operator(control_plane: Path, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    running = serve_operator(
        control_plane, namespace, tmp_path, {"KUBEDISTILL_ARTIFACT_ROOT": tmp_path.as_uri()}
    )
    yield running.start()
    running.stop()


def _servers(apps: client.AppsV1Api, namespace: str) -> list[str]:
    found = apps.list_namespaced_deployment(namespace, label_selector="kubedistill.io/alias=smart").items
    return [d.metadata.name for d in found if d.metadata.deletion_timestamp is None]


def test_the_operator_serves_an_alias_and_watches_its_servers(
    k8s_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    custom, core, apps = (
        client.CustomObjectsApi(k8s_api),
        client.CoreV1Api(k8s_api),
        client.AppsV1Api(k8s_api),
    )
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "ModelAlias",
        "metadata": {"name": "smart"},
        "spec": {
            "target": {"ggufURI": "s3://models/student.gguf"},
            "fallback": {"provider": {"model": "openai/teacher", "baseURL": "http://127.0.0.1:9/v1"}},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", body)
    logs = lambda: operator.logs()[-3000:]  # noqa: E731

    (server,) = wait_for(lambda: _servers(apps, namespace), timeout=60, what=f"a model server\n{logs()}")

    def routed() -> list[str]:
        try:
            data = core.read_namespaced_config_map(gw.CONFIG_MAP, namespace).data or {}
        except ApiException:
            return []
        return [e["model_name"] for e in yaml.safe_load(data.get(gw.CONFIG_KEY, "")).get("model_list") or []]

    assert wait_for(routed, timeout=60, what=f"the gateway config\n{logs()}") == ["smart:fallback"]

    def gateways() -> list[Any]:
        items: list[Any] = apps.list_namespaced_deployment(
            namespace, field_selector=f"metadata.name={GATEWAY_NAME}"
        ).items
        return items

    assert wait_for(gateways, timeout=30, what="the gateway")[0].spec.replicas == 1

    # The Deployment watch: a model server deleted behind the operator's back is made again.
    apps.delete_namespaced_deployment(server, namespace)
    wait_for(lambda: _servers(apps, namespace) == [server], timeout=60, what=f"the server back\n{logs()}")

    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", "smart")
    wait_for(lambda: routed() == [] or None, timeout=60, what=f"the route gone\n{logs()}")
