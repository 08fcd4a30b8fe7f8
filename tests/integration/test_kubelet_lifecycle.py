"""The local kubelet runs long-lived Pods the way a node does, on the real control plane: probes that
move Pods in and out of their Service's EndpointSlice, restarts with back-off, graceful termination
with preStop hooks, init containers, and logs through the API server (what `kubectl logs` calls)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import wait_for
from kubedistill_testing.kubelet import LocalKubelet, loopback_address

pytestmark = pytest.mark.cluster

POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
# Time the control plane may take to see a status change: the kubelet's patch, the EndpointSlice
# controller's watch and its write, on a loaded two-core machine.
SLACK_S = 4.0

READY_SERVER = """
import http.server, os
healthy = [True]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path in ("/fail", "/recover"):
            healthy[0] = self.path == "/recover"
        self.send_response(503 if self.path == "/ready" and not healthy[0] else 200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
"""


def python_container(script: str, name: str = "main", **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "python:3.11", "command": ["python", "-c", script], **extra}


def pod_body(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": spec.pop("labels", {})},
            "spec": {"restartPolicy": "Always", "containers": list(containers), **spec}}  # fmt: skip


def read_pod(core: client.CoreV1Api, name: str, namespace: str) -> Any:
    return core.read_namespaced_pod(name, namespace)


def gone(core: client.CoreV1Api, name: str, namespace: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def main_status(core: client.CoreV1Api, name: str, namespace: str) -> Any:
    """The first container's status, None until the kubelet has written one."""
    statuses = read_pod(core, name, namespace).status.container_statuses or []
    return statuses[0] if statuses else None


def running_pid(core: client.CoreV1Api, name: str, namespace: str) -> int | None:
    status = main_status(core, name, namespace)
    if status is None or not status.state.running:
        return None
    return int(status.container_id.removeprefix("local://"))


def pod_log(core: client.CoreV1Api, name: str, namespace: str, **options: Any) -> str:
    """What `kubectl logs` prints. Read raw: kubernetes client 36.0 returns the repr of the bytes as the
    str (kubernetes-client/python#2596)."""
    response = core.read_namespaced_pod_log(name, namespace, _preload_content=False, **options)
    return str(response.data.decode())


def error_message(err: ApiException) -> str:
    """The message of the API server's Status answer (the kubelet's own words for log requests)."""
    return str(json.loads(err.body)["message"])


def log_text(kubelet: LocalKubelet, namespace: str, pod: str) -> str:
    path = kubelet.log_path(namespace, pod, "main")
    return path.read_text() if path.exists() else ""


def events(core: client.CoreV1Api, pod: str, namespace: str) -> list[tuple[str, str]]:
    """(reason, message) of the Events on a Pod, as `kubectl describe pod` lists them."""
    listed = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}").items
    return [(e.reason, e.message) for e in listed]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# ---------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------


def endpoint_readiness(discovery: client.DiscoveryV1Api, service: str, namespace: str) -> dict[str, bool]:
    slices = discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}"
    ).items
    return {
        address: bool(endpoint.conditions.ready)
        for piece in slices
        for endpoint in piece.endpoints or []
        for address in endpoint.addresses
    }


def test_readiness_probe_moves_a_pod_out_of_and_back_into_its_endpoint_slice(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, record_property: Any
) -> None:
    core, discovery = client.CoreV1Api(k8s_api), client.DiscoveryV1Api(k8s_api)
    period, failures = 1, 2
    probe = {
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }
    core.create_namespaced_service(
        namespace,
        {"metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}},
    )  # fmt: skip
    for name in ("web-0", "web-1"):
        server = python_container(
            READY_SERVER,
            env=[POD_IP_ENV],
            ports=[{"name": "http", "containerPort": 8080}],
            readinessProbe=probe,
        )
        core.create_namespaced_pod(namespace, pod_body(name, server, labels={"app": "web"}))

    def both_ready() -> dict[str, str] | None:
        pods = {n: read_pod(core, n, namespace).status.pod_ip for n in ("web-0", "web-1")}
        readiness = endpoint_readiness(discovery, "web", namespace)
        ips = set(pods.values())
        return pods if None not in ips and readiness == dict.fromkeys(ips, True) else None

    ips = wait_for(both_ready, 60, what="both pods ready in the EndpointSlice")
    # Two replicas listen on the same port, each on its own address.
    assert ips["web-0"] != ips["web-1"]
    web0 = f"http://{loopback_address(ips['web-0'])}:8080"

    urllib.request.urlopen(f"{web0}/fail", timeout=5).close()
    failed_at = time.monotonic()
    wait_for(
        lambda: endpoint_readiness(discovery, "web", namespace) == {ips["web-0"]: False, ips["web-1"]: True},
        period * failures + SLACK_S,
        0.05,
        what="web-0 to leave the ready endpoints",
    )
    unready_after = time.monotonic() - failed_at
    record_property("endpoint_unready_after_s", round(unready_after, 2))
    assert unready_after >= period * (failures - 1)  # not before the threshold could be met
    ready = next(c for c in read_pod(core, "web-0", namespace).status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "ContainersNotReady")

    urllib.request.urlopen(f"{web0}/recover", timeout=5).close()
    recovered_at = time.monotonic()
    wait_for(
        lambda: endpoint_readiness(discovery, "web", namespace) == {ips["web-0"]: True, ips["web-1"]: True},
        period + SLACK_S,
        0.05,
        what="web-0 to come back",
    )
    record_property("endpoint_ready_again_after_s", round(time.monotonic() - recovered_at, 2))
    assert read_pod(core, "web-0", namespace).status.container_statuses[0].restart_count == 0


SLOW_LISTENER = """
import os, socket, time
time.sleep(2)
server = socket.create_server((os.environ["POD_IP"], 9000))
while True:
    server.accept()[0].close()
"""


def test_startup_probe_holds_back_readiness_until_the_port_opens(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    tcp = {"tcpSocket": {"port": 9000}, "periodSeconds": 1}
    container = python_container(
        SLOW_LISTENER, env=[POD_IP_ENV], startupProbe={**tcp, "failureThreshold": 10}, readinessProbe=tcp
    )
    core.create_namespaced_pod(namespace, pod_body("slow", container))

    early = wait_for(
        lambda: (s := main_status(core, "slow", namespace)) and s.state.running and s, what="slow to run"
    )
    assert (early.started, early.ready) == (False, False)
    late = wait_for(
        lambda: (s := main_status(core, "slow", namespace)).ready and s, 2 + 1 + SLACK_S, what="slow ready"
    )
    assert late.started is True and late.restart_count == 0


DIES_AFTER_A_SECOND = """
import os, time
if os.path.exists("dead"):
    os.remove("dead")
time.sleep(1)
open("dead", "w").close()
time.sleep(600)
"""


def test_failed_liveness_probe_restarts_the_container(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    liveness = {
        "exec": {"command": ["python", "-c", "import os, sys; sys.exit(os.path.exists('dead'))"]},
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    core.create_namespaced_pod(
        namespace, pod_body("flaky", python_container(DIES_AFTER_A_SECOND, livenessProbe=liveness))
    )

    def restarted() -> Any:
        status = main_status(core, "flaky", namespace)
        return status if status and status.restart_count >= 1 and status.state.running else None

    status = wait_for(restarted, 30, what="flaky to be restarted by its liveness probe")
    # Stopped with SIGTERM (it does not trap it), as the kubelet stops a container that fails liveness.
    assert (status.last_state.terminated.exit_code, status.last_state.terminated.reason) == (143, "Error")
    assert read_pod(core, "flaky", namespace).status.phase == "Running"
    said = events(core, "flaky", namespace)
    assert ("Unhealthy", "Liveness probe failed: exit code 1") in said
    assert ("Killing", "Container main failed liveness probe, will be restarted") in said


# ---------------------------------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------------------------------


def test_a_killed_container_is_restarted_with_a_growing_back_off(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, record_property: Any
) -> None:
    core = client.CoreV1Api(k8s_api)
    created = core.create_namespaced_pod(
        namespace, pod_body("crashy", python_container("import time; time.sleep(600)"))
    )
    uid = created.metadata.uid
    pid = wait_for(lambda: running_pid(core, "crashy", namespace), what="crashy to run")
    waits, messages = [], []
    for _ in range(3):
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def next_run(old: int = pid) -> int | None:
            (status,) = read_pod(core, "crashy", namespace).status.container_statuses
            if status.state.waiting and status.state.waiting.reason == "CrashLoopBackOff":
                messages.append(status.state.waiting.message)
            new = running_pid(core, "crashy", namespace)
            return new if new and new != old else None

        pid = wait_for(next_run, 30, 0.05, what="crashy to be restarted")
        waits.append(time.monotonic() - killed_at)

    record_property("restart_waits_s", [round(w, 2) for w in waits])
    # The kubelet fixture's back-off: 1 s, doubling, capped at 4 s.
    for wait, delay in zip(waits, (1, 2, 4), strict=True):
        assert delay <= wait < delay + SLACK_S, waits
    assert {m.split(" restarting")[0] for m in messages} == {"back-off 1s", "back-off 2s", "back-off 4s"}
    assert f"container=main pod=crashy_{namespace}(" in messages[0]
    (status,) = read_pod(core, "crashy", namespace).status.container_statuses
    assert status.restart_count == 3
    backoff = f"Back-off restarting failed container main in pod crashy_{namespace}({uid})"
    assert ("BackOff", backoff) in events(core, "crashy", namespace)
    assert (status.last_state.terminated.exit_code, status.last_state.terminated.reason) == (137, "Error")


# ---------------------------------------------------------------------------------------------------
# Graceful termination
# ---------------------------------------------------------------------------------------------------

TRAPS_SIGTERM = """
import os, signal, sys, time
marks = os.environ["MARKS"]
def on_term(signum, frame):
    open(os.path.join(marks, "sigterm"), "w").write(str(time.time()))
    if os.environ["ON_TERM"] == "exit":
        time.sleep(1)  # clean-up that needs a second of the grace period
        open(os.path.join(marks, "cleaned"), "w").write(str(time.time()))
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("serving", flush=True)
while True:
    time.sleep(0.05)
"""
PRE_STOP = "import os, time; open(os.path.join(os.environ['MARKS'], 'prestop'), 'w').write(str(time.time()))"


def terminating_pod(name: str, marks: Path, on_term: str, grace: int) -> dict[str, Any]:
    env = [{"name": "MARKS", "value": str(marks)}, {"name": "ON_TERM", "value": on_term}]
    container = python_container(
        TRAPS_SIGTERM, env=env, lifecycle={"preStop": {"exec": {"command": ["python", "-c", PRE_STOP]}}}
    )
    return pod_body(name, container, terminationGracePeriodSeconds=grace)


def delete_and_wait(core: client.CoreV1Api, name: str, namespace: str) -> tuple[float, float, int]:
    """Delete a running Pod; (when it was deleted, when its object was gone, its container's pid)."""
    pid = wait_for(lambda: running_pid(core, name, namespace), what=f"{name} to run")
    deleted_at = time.time()
    core.delete_namespaced_pod(name, namespace)
    wait_for(lambda: gone(core, name, namespace), 30, 0.05, what=f"{name} to be removed")
    return deleted_at, time.time(), pid


def mark(marks: Path, name: str) -> float:
    return float((marks / name).read_text())


def test_delete_runs_pre_stop_then_gives_a_trapping_process_its_grace_period(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, tmp_path: Path, record_property: Any
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(namespace, terminating_pod("graceful", tmp_path, "exit", grace=4))
    wait_for(lambda: log_text(kubelet, namespace, "graceful") == "serving\n", what="graceful to serve")

    deleted_at, gone_at, pid = delete_and_wait(core, "graceful", namespace)

    prestop, sigterm, cleaned = (
        mark(tmp_path, "prestop"),
        mark(tmp_path, "sigterm"),
        mark(tmp_path, "cleaned"),
    )
    record_property("prestop_to_sigterm_s", round(sigterm - prestop, 2))
    record_property("sigterm_to_clean_exit_s", round(cleaned - sigterm, 2))
    record_property("delete_to_pod_gone_s", round(gone_at - deleted_at, 2))
    assert deleted_at <= prestop <= sigterm, "preStop runs first, then SIGTERM"
    assert cleaned - sigterm >= 1.0, "the process used a second of its grace period undisturbed"
    assert cleaned <= gone_at, "the Pod object goes away only after its process has stopped"
    assert not alive(pid)


def test_a_process_that_ignores_sigterm_is_killed_when_the_grace_period_ends(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, tmp_path: Path, record_property: Any
) -> None:
    core = client.CoreV1Api(k8s_api)
    grace = 3
    core.create_namespaced_pod(namespace, terminating_pod("stubborn", tmp_path, "ignore", grace=grace))
    wait_for(lambda: log_text(kubelet, namespace, "stubborn") == "serving\n", what="stubborn to serve")

    deleted_at, gone_at, pid = delete_and_wait(core, "stubborn", namespace)

    assert not alive(pid)
    assert mark(tmp_path, "prestop") <= mark(tmp_path, "sigterm")
    record_property("delete_to_pod_gone_s", round(gone_at - deleted_at, 2))
    # SIGKILL comes when the grace period, counted from the deletion, is over: not before, not much after.
    assert grace <= gone_at - deleted_at < grace + SLACK_S


# ---------------------------------------------------------------------------------------------------
# Init containers
# ---------------------------------------------------------------------------------------------------

APPEND = "import os, sys; open(os.environ['MARKS'] + '/order', 'a').write(sys.argv[1] + '\\n')"
FAIL_ONCE = """
import os, sys
marker = os.environ["MARKS"] + "/failed-once"
if not os.path.exists(marker):
    open(marker, "w").close()
    print("model not there yet", flush=True)
    sys.exit(3)
open(os.environ["MARKS"] + "/order", "a").write("fetch\\n")
"""


def test_init_containers_run_in_order_and_a_failed_one_is_retried(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(k8s_api)
    env = [{"name": "MARKS", "value": str(tmp_path)}]
    init = [
        python_container(FAIL_ONCE, "fetch", env=env),
        {"name": "check", "image": "python:3.11", "command": ["python", "-c", APPEND, "check"], "env": env},
    ]
    main = {"name": "main", "image": "python:3.11", "env": env,
            "command": ["python", "-c", APPEND + "; import time; time.sleep(600)", "main"]}  # fmt: skip
    core.create_namespaced_pod(namespace, pod_body("staged", main, initContainers=init))

    status = wait_for(
        lambda: (s := read_pod(core, "staged", namespace).status).phase == "Running" and s, 30, what="staged"
    )
    wait_for(lambda: (tmp_path / "order").exists() and (tmp_path / "order").read_text().count("\n") == 3)
    assert (tmp_path / "order").read_text() == "fetch\ncheck\nmain\n"
    fetch, check = status.init_container_statuses
    assert (fetch.restart_count, fetch.last_state.terminated.exit_code) == (1, 3)
    assert (fetch.state.terminated.reason, check.state.terminated.reason) == ("Completed", "Completed")
    # Each init container keeps its own log; the failed attempt's is the previous one.
    logs = pod_log(core, "staged", namespace, container="fetch", previous=True)
    assert logs == "model not there yet\n"


def test_a_failed_init_container_keeps_the_pod_from_starting_and_says_why(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(k8s_api)
    fetch = python_container(
        "import sys; print('s3://models/student.gguf: no such key', file=sys.stderr); sys.exit(2)",
        "fetch",
        terminationMessagePolicy="FallbackToLogsOnError",
    )
    main = python_container(f"open({str(tmp_path / 'started')!r}, 'w').close()")
    core.create_namespaced_pod(
        namespace, pod_body("blocked", main, initContainers=[fetch], restartPolicy="Never")
    )

    status = wait_for(
        lambda: (s := read_pod(core, "blocked", namespace).status).phase == "Failed" and s, what="blocked"
    )
    (init,) = status.init_container_statuses
    assert (init.state.terminated.exit_code, init.state.terminated.reason) == (2, "Error")
    assert init.state.terminated.message == "s3://models/student.gguf: no such key"
    (waiting,) = status.container_statuses
    assert waiting.state.waiting.reason == "PodInitializing"
    initialized = next(c for c in status.conditions if c.type == "Initialized")
    assert (initialized.status, initialized.message) == (
        "False",
        "containers with incomplete status: [fetch]",
    )
    assert not (tmp_path / "started").exists()
    with pytest.raises(ApiException) as caught:
        pod_log(core, "blocked", namespace, container="main")
    assert caught.value.status == 400 and "is waiting to start" in error_message(caught.value)


# ---------------------------------------------------------------------------------------------------
# Logs through the API server
# ---------------------------------------------------------------------------------------------------

CRASHES_ONCE = """
import os, sys
marker = os.path.join(os.path.dirname(os.environ["KUBEDISTILL_TERMINATION_LOG"]), "crashed")
if not os.path.exists(marker):
    open(marker, "w").close()
    print("run 1: loading", flush=True)
    print("run 1: out of memory", flush=True)
    sys.exit(137)
for i in range(1, 6):
    print(f"run 2: line {i}", flush=True)
"""


def test_logs_of_a_finished_pod_with_tail_and_previous(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace, pod_body("crashed", python_container(CRASHES_ONCE), restartPolicy="OnFailure")
    )
    wait_for(
        lambda: read_pod(core, "crashed", namespace).status.phase == "Succeeded", what="crashed to finish"
    )

    assert pod_log(core, "crashed", namespace) == "".join(f"run 2: line {i}\n" for i in range(1, 6))
    assert pod_log(core, "crashed", namespace, tail_lines=2) == "run 2: line 4\nrun 2: line 5\n"
    previous = pod_log(core, "crashed", namespace, previous=True)
    assert previous == "run 1: loading\nrun 1: out of memory\n"
    assert pod_log(core, "crashed", namespace, limit_bytes=5) == "run 2"


TICKS_UNTIL_TOLD = """
import os, time
print("tick 0", flush=True)
while not os.path.exists(os.environ["STOP_FILE"]):
    time.sleep(0.05)
print("tick 1", flush=True)
"""


def test_follow_streams_a_running_container_until_it_exits(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(k8s_api)
    stop = tmp_path / "stop"
    ticker = python_container(TICKS_UNTIL_TOLD, env=[{"name": "STOP_FILE", "value": str(stop)}])
    core.create_namespaced_pod(namespace, pod_body("ticker", ticker, restartPolicy="Never"))
    wait_for(lambda: running_pid(core, "ticker", namespace), what="ticker to run")

    response = core.read_namespaced_pod_log("ticker", namespace, follow=True, _preload_content=False)
    assert response.read(7) == b"tick 0\n"  # while the container runs: it waits for the stop file
    stop.touch()
    assert response.read() == b"tick 1\n"  # and the stream ends when the container does
    response.release_conn()
    assert read_pod(core, "ticker", namespace).status.phase in ("Running", "Succeeded")


def test_log_requests_the_kubelet_refuses_say_why(
    k8s_api: client.ApiClient, kubelet: LocalKubelet, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_pod(
        namespace, pod_body("once", python_container("print('hi')"), restartPolicy="Never")
    )
    wait_for(lambda: read_pod(core, "once", namespace).status.phase == "Succeeded", what="once")

    for kwargs, message in (
        ({"previous": True}, 'previous terminated container "main" in pod "once" not found'),
        ({"timestamps": True}, "the local kubelet keeps no timestamps"),
    ):
        with pytest.raises(ApiException) as caught:
            pod_log(core, "once", namespace, **kwargs)
        assert caught.value.status == 400 and message in error_message(caught.value), error_message(
            caught.value
        )


def test_the_kubelet_api_wants_a_client_certificate_from_the_cluster_ca(
    k8s_api: client.ApiClient, kubelet: LocalKubelet
) -> None:
    node = client.CoreV1Api(k8s_api).read_node(kubelet.node_name)
    port = node.status.daemon_endpoints.kubelet_endpoint.port
    assert port == kubelet.port
    context = ssl._create_unverified_context()
    with pytest.raises((ssl.SSLError, ConnectionResetError, urllib.error.URLError)):
        urllib.request.urlopen(
            f"https://127.0.0.1:{port}/containerLogs/default/x/main", context=context, timeout=5
        )
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # it listens: the refusal above was the handshake's
    assert (node.status.addresses[0].type, node.status.addresses[0].address) == ("InternalIP", "127.0.0.1")
