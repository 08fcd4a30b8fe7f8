"""What the serving tests share: the operator with its gateway on, the running pieces of one serving test
(`Serving`; the fixture that starts them is in this directory's conftest), a client of the gateway that
says which backend answered, a client loop that counts failures during a swap, and a killer of a model
server.

The gateway is reached only as a Pod would reach it: through its Service's ClusterIP, which the local
kubelet's Service proxy stands in for at `service_loopback_address(clusterIP)`."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubedistill.api.models import GROUP, VERSION
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.kubelet import LocalKubelet, service_loopback_address
from kubedistill_testing.operator_process import OperatorProcess

GATEWAY = "kubedistill-gateway"
GATEWAY_PORT = 4000
ALIAS_LABEL = "kubedistill.io/alias"
# What LiteLLM names the deployment (our model_info.id) that answered a request.
MODEL_ID_HEADER = "x-litellm-model-id"
REQUEST_TIMEOUT_S = 60.0
FAKE_IMAGE = "kubedistill.test/serve-fake-stage"
ALIAS = "smart"
TEACHER_MODEL = "fake-teacher"
# The gateway's pods start a Python with LiteLLM's imports on a shared machine: a minute, not seconds.
SERVE_WAIT_S = 300.0


def serve_operator(kubeconfig: Path, namespace: str, workdir: Path, env: dict[str, str]) -> OperatorProcess:
    """An operator process that serves aliases: gateway on, in the test's namespace."""
    gateway = {
        "KUBEDISTILL_GATEWAY_ENABLED": "true",
        "KUBEDISTILL_GATEWAY_NAMESPACE": namespace,
        # What the chart sets beside kopf's namespaces: without it the gateway's alias list (model-name
        # ownership, the periodic re-check) spans the cluster, and an alias left by an earlier test in a
        # terminating namespace takes `smart` from this one.
        "KUBEDISTILL_NAMESPACES": namespace,
    }
    return OperatorProcess(kubeconfig, namespace, workdir, {**env, **gateway})


# ---------------------------------------------------------------------------------------------------
# The alias and its servers, as the API shows them
# ---------------------------------------------------------------------------------------------------


def get_alias(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "modelaliases", name
    )
    return found


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def served(alias: dict[str, Any], role: str) -> dict[str, Any] | None:
    return next((s for s in (alias.get("status") or {}).get("served") or [] if s["role"] == role), None)


def server_deployments(apps: client.AppsV1Api, namespace: str, alias: str) -> list[str]:
    items = apps.list_namespaced_deployment(namespace, label_selector=f"{ALIAS_LABEL}={alias}").items
    return sorted(d.metadata.name for d in items)


def wait_until(predicate: Callable[[], Any], what: str, timeout: float, on_timeout: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


@dataclass
class Serving:
    """The running pieces of one serving test, and the calls its steps share."""

    namespace: str
    core: client.CoreV1Api
    apps: client.AppsV1Api
    custom: client.CustomObjectsApi
    operator: OperatorProcess
    kubelet: LocalKubelet
    teacher: FakeTeacher
    gguf_uri: str
    master_key: str

    def provider(self) -> dict[str, Any]:
        return {"provider": {"model": f"openai/{TEACHER_MODEL}", "baseURL": self.teacher.base_url}}

    def alias(self, name: str = ALIAS) -> dict[str, Any]:
        return get_alias(self.custom, self.namespace, name)

    def create_alias(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelAlias", "metadata": {"name": name}}
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "modelaliases", {**body, "spec": spec}
        )

    def patch_spec(self, spec: dict[str, Any], name: str = ALIAS) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "modelaliases", name, {"spec": spec}
        )

    def gateway(self) -> GatewayClient:
        return GatewayClient.of(self.core, self.namespace, self.master_key)

    def diagnose(self) -> str:
        parts = [json.dumps(self.alias().get("status"), indent=1)]
        for path in sorted((self.kubelet.root / "logs" / self.namespace).rglob("*.log")):
            parts.append(f"--- {path.parent.name}/{path.name}\n{path.read_text(errors='replace')[-1500:]}")
        parts.append(f"--- operator\n{self.operator.logs()[-3000:]}")
        return "\n".join(parts)

    def settled(self, roles: dict[str, dict[str, Any]], timeout: float = SERVE_WAIT_S) -> dict[str, Any]:
        """Wait until the alias serves exactly these targets (role → target fields), is Ready, its swap
        is over (Progressing not True) and no model server of an earlier target is left."""

        def done() -> dict[str, Any] | None:
            assert self.operator.alive(), self.operator.logs()[-4000:]
            alias = self.alias()
            ready, progressing = condition(alias, "Ready"), condition(alias, "Progressing")
            now = {s["role"]: s for s in (alias.get("status") or {}).get("served") or []}
            if set(now) != set(roles) or not (ready and ready["status"] == "True"):
                return None
            if progressing and progressing["status"] == "True":
                return None
            for role, target in roles.items():
                shown = {**now[role]["target"], "weight": now[role]["weight"]}
                if any(shown.get(key) != value for key, value in target.items()):
                    return None
            wanted = {s["server"] for s in now.values() if s.get("server")}
            if set(server_deployments(self.apps, self.namespace, ALIAS)) != wanted:
                return None
            return alias

        found: dict[str, Any] = wait_until(done, f"{ALIAS} to serve {roles}", timeout, self.diagnose)
        return found


# ---------------------------------------------------------------------------------------------------
# The gateway, through its Service
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all
    deployment_id: str
    seconds: float
    text: str


@dataclass
class GatewayClient:
    host: str
    port: int
    api_key: str

    @classmethod
    def of(cls, core: client.CoreV1Api, namespace: str, api_key: str) -> GatewayClient:
        cluster_ip = core.read_namespaced_service(GATEWAY, namespace).spec.cluster_ip
        return cls(service_loopback_address(cluster_ip), GATEWAY_PORT, api_key)

    def chat(self, model: str, prompt: str, max_tokens: int = 8) -> Answer:
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        )
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        started = time.monotonic()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = connection.getresponse()
            text = response.read().decode(errors="replace")
            return Answer(
                response.status, response.getheader(MODEL_ID_HEADER) or "", time.monotonic() - started, text
            )
        except (OSError, http.client.HTTPException) as err:
            return Answer(0, "", time.monotonic() - started, f"{type(err).__name__}: {err}")
        finally:
            connection.close()


@dataclass
class ClientLoop:
    """Sends requests one after another until stopped; counts each outcome and its latency."""

    gateway: GatewayClient
    model: str
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ClientLoop:
        self._thread = threading.Thread(target=self._run, name="client-loop", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=REQUEST_TIMEOUT_S + 5)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            self.answers.append(self.gateway.chat(self.model, f"Ticket {n}: where is my parcel?"))

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def summary(self) -> dict[str, Any]:
        latencies = sorted(a.seconds * 1000 for a in self.answers)
        cut = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
        return {
            "total": len(self.answers),
            "failed": len(self.failures()),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p95_ms": round(cut[18], 1) if cut else None,
            "answered_by": sorted({a.deployment_id for a in self.answers}),
        }


# ---------------------------------------------------------------------------------------------------
# A model server's process, killed as a crash would
# ---------------------------------------------------------------------------------------------------


def server_pids(core: client.CoreV1Api, namespace: str, server: str) -> list[int]:
    """Process ids of the running `server` containers of one model server's Pods (local://PID ids)."""
    pids = []
    for pod in core.list_namespaced_pod(namespace, label_selector=f"{ALIAS_LABEL}").items:
        if not pod.metadata.name.startswith(f"{server}-"):
            continue
        for status in (pod.status and pod.status.container_statuses) or []:
            if status.name == "server" and status.state.running and status.container_id:
                pids.append(int(status.container_id.removeprefix("local://")))
    return pids


@contextlib.contextmanager
def kept_down(core: client.CoreV1Api, namespace: str, server: str) -> Any:
    """Kill the server's process, and again each time the kubelet restarts it, until the block ends."""
    stop = threading.Event()
    kills: list[int] = []

    def killer() -> None:
        while not stop.is_set():
            with contextlib.suppress(ApiException):
                for pid in server_pids(core, namespace, server):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                        kills.append(pid)
            stop.wait(0.1)

    thread = threading.Thread(target=killer, name="server-killer", daemon=True)
    thread.start()
    try:
        yield kills
    finally:
        stop.set()
        thread.join(timeout=10)
