"""The SDK (and so the CLI) authenticates with a bearer-token kubeconfig, as on managed clusters.

kubernetes 36's generated client ignores the token its own kubeconfig loader stores; a request
then arrives as system:anonymous and is refused. A ServiceAccount token from the TokenRequest API,
allowed to read DistillationJobs in one namespace, proves the token is really sent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kubedistill import Distiller

pytestmark = pytest.mark.cluster


def token_kubeconfig(admin_kubeconfig: Path, token: str, dest: Path) -> Path:
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "reader", "user": {"token": token}}],
        "contexts": [{"name": "reader", "context": {"cluster": cluster["name"], "user": "reader"}}],
        "current-context": "reader",
    }
    dest.write_text(yaml.safe_dump(config))
    return dest


def test_a_token_kubeconfig_is_sent_as_the_serviceaccount(
    control_plane: Path, k8s_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    core, rbac = client.CoreV1Api(k8s_api), client.RbacAuthorizationV1Api(k8s_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "reader"},
            "rules": [
                {"apiGroups": ["kubedistill.io"], "resources": ["distillationjobs"], "verbs": ["get", "list"]}
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token

    kubeconfig = token_kubeconfig(control_plane, token, tmp_path / "token-kubeconfig")
    with Distiller(namespace=namespace, kubeconfig=kubeconfig) as d:
        assert d.list() == []
