"""The local kubelet's Service proxy on the real control plane: a Service's ClusterIP port forwards to the
Ready Pods of its EndpointSlices, round-robin, following readiness; a Pod reaches it by the Service's name.

The backends are two replicas of a tiny HTTP server that answers with its Pod's name, and is Ready only
while the file `not-ready` is absent from its working directory."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubedistill_testing.kubelet import LocalKubelet, service_loopback_address

pytestmark = pytest.mark.cluster

WAIT_S = 60.0
ECHO = """
import http.server, os, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ready = not os.path.exists(os.path.join(sys.argv[1], os.environ["HOSTNAME"]))
        body = (os.environ["HOSTNAME"] if self.path != "/ready" or ready else "no").encode()
        self.send_response(200 if self.path != "/ready" or ready else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), Echo).serve_forever()
"""


def wait_until(predicate: Any, what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def echo_deployment(flags: Path) -> dict[str, Any]:
    container = {
        "name": "echo",
        "image": "kubedistill.test/python",
        "command": ["python", "-c", ECHO, str(flags)],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": 8080},
            "periodSeconds": 1,
            "failureThreshold": 1,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "echo"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "echo"}},
            "template": {"metadata": {"labels": {"app": "echo"}}, "spec": {"containers": [container]}},
        },
    }


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


def test_service_ports_forward_round_robin_to_ready_endpoints_and_pods_resolve_service_names(
    kubelet: LocalKubelet, namespace: str, k8s_api: client.ApiClient, tmp_path: Path
) -> None:
    core, apps = client.CoreV1Api(k8s_api), client.AppsV1Api(k8s_api)
    flags = tmp_path / "flags"
    flags.mkdir()
    apps.create_namespaced_deployment(namespace, echo_deployment(flags))
    service = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "echo"},
            "spec": {
                "selector": {"app": "echo"},
                "ports": [{"name": "web", "port": 80, "targetPort": "http"}],
            },
        },
    )
    url = f"http://{service_loopback_address(service.spec.cluster_ip)}:80/"

    def both_answer() -> set[str] | None:
        names = {get(url) for _ in range(6)}
        return names if len(names) == 2 and None not in names else None

    pods = wait_until(both_answer, "both replicas to answer through the Service")
    # Round-robin: consecutive requests alternate between the two Ready endpoints.
    first, second, third = get(url), get(url), get(url)
    assert first != second and first == third, (first, second, third)

    # One replica stops being Ready: the proxy sends it nothing more.
    gone = sorted(pods)[0]
    (flags / gone).write_text("")
    wait_until(lambda: {get(url) for _ in range(4)} == set(pods) - {gone}, f"{gone} to leave the rotation")
    (flags / gone).unlink()
    wait_until(both_answer, f"{gone} to come back")

    # A Pod reaches the Service by its name, as through cluster DNS (the kubelet's per-pod /etc/hosts).
    if kubelet.namespace_problem:
        pytest.skip(f"Pods cannot resolve Service names here: {kubelet.namespace_problem}")
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://echo.{namespace}.svc:80/').read().decode())"
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "client"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {"name": "client", "image": "kubedistill.test/python", "command": ["python", "-c", fetch]}
                ],
            },
        },
    )

    def finished() -> str | None:
        phase = core.read_namespaced_pod("client", namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(finished, "the client pod to finish")
    output = kubelet.log_path(namespace, "client", "client").read_text()
    assert phase == "Succeeded", output
    assert output.strip() in pods, output
