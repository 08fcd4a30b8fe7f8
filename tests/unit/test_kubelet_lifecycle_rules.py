"""The local kubelet's pure lifecycle parts: probes, restart back-off, Pod status, addresses, logs."""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubedistill_testing.kubelet import ConfigError, ContainerState, loopback_address, pod_phase
from kubedistill_testing.kubelet.addresses import PodAddresses
from kubedistill_testing.kubelet.containers import crash_loop_message, pod_status, restart_delay
from kubedistill_testing.kubelet.logs import (
    BadQuery,
    LogQuery,
    parse_query,
    read_tail_lines,
    stream_log,
    tail_of,
)
from kubedistill_testing.kubelet.probes import (
    Exec,
    HttpGet,
    Probe,
    ProbeCounter,
    Sleep,
    Target,
    TcpSocket,
    handler_action,
    run_action,
)

CONTAINER: dict[str, Any] = {"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}
POD: dict[str, Any] = {"metadata": {"name": "web-1", "namespace": "ns", "uid": "u-1"}}


# -- probes -------------------------------------------------------------------------------------------


def test_probe_defaults_are_the_apis() -> None:
    probe = Probe.from_spec({"tcpSocket": {"port": 8080}}, CONTAINER)
    assert probe == Probe(TcpSocket(8080), 0.0, 10.0, 1.0, 1, 3)


def test_http_probe_resolves_a_named_port_and_keeps_headers() -> None:
    spec = {
        "httpGet": {"port": "http", "path": "/ready", "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    probe = Probe.from_spec(spec, CONTAINER)
    assert probe.action == HttpGet(8080, "/ready", None, "HTTP", (("X-Probe", "1"),))
    assert (probe.period, probe.failure_threshold) == (1.0, 2)


def test_unknown_port_name_and_grpc_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no port named 'grpc'"):
        handler_action({"tcpSocket": {"port": "grpc"}}, CONTAINER)
    with pytest.raises(ConfigError, match="only httpGet, tcpSocket, exec and sleep"):
        handler_action({"grpc": {"port": 9000}}, CONTAINER)


def test_verdict_changes_only_after_threshold_results_in_a_row() -> None:
    counter = ProbeCounter(success_threshold=2, failure_threshold=3)
    assert [counter.observe(ok) for ok in (True, True)] == [None, True]
    assert [counter.observe(ok) for ok in (False, False, True, False, False, False)] == [
        True, True, True, True, True, False,
    ]  # fmt: skip
    assert [counter.observe(ok) for ok in (True, True)] == [False, True]


def test_liveness_starts_out_alive() -> None:
    assert ProbeCounter(1, 1, result=True).result is True


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def target(tmp_path: Path) -> Target:
    return Target("127.0.0.1", {"PATH": os.environ["PATH"]}, str(tmp_path), {"python": sys.executable})


def test_http_get_succeeds_below_400(http_server: int, tmp_path: Path) -> None:
    assert run_action(HttpGet(http_server, "/ok"), target(tmp_path), 2) == (True, "")
    ok, why = run_action(HttpGet(http_server, "/sick"), target(tmp_path), 2)
    assert (ok, why) == (False, "HTTP probe failed with statuscode: 503")


def test_tcp_socket_fails_on_a_closed_port(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert run_action(TcpSocket(port), target(tmp_path), 1)[0] is True
    ok, why = run_action(TcpSocket(port), target(tmp_path), 1)
    assert not ok and "ConnectionRefusedError" in why


def test_exec_runs_in_the_container_directory_and_times_out(tmp_path: Path) -> None:
    (tmp_path / "alive").touch()
    check = Exec(("python", "-c", "import os, sys; sys.exit(not os.path.exists('alive'))"))
    assert run_action(check, target(tmp_path), 5)[0] is True
    (tmp_path / "alive").unlink()
    assert run_action(check, target(tmp_path), 5) == (False, "exit code 1")
    ok, why = run_action(Exec(("python", "-c", "import time; time.sleep(30)")), target(tmp_path), 0.5)
    assert (ok, why) == (False, "command timed out after 0.5s")


def test_a_pre_stop_sleep_is_bounded_by_the_grace_period(tmp_path: Path) -> None:
    action = handler_action({"sleep": {"seconds": 30}}, CONTAINER)
    assert action == Sleep(30.0)
    assert run_action(action, target(tmp_path), 0.1) == (True, "")


# -- restarts and status ------------------------------------------------------------------------------


def test_back_off_doubles_up_to_the_cap() -> None:
    assert [restart_delay(n, 10, 300) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert (
        crash_loop_message(20, "web", POD) == "back-off 20s restarting failed container=web pod=web-1_ns(u-1)"
    )


def crashed(name: str, code: int) -> ContainerState:
    return ContainerState(
        name,
        "img",
        state={"waiting": {"reason": "CrashLoopBackOff"}},
        last_state={"terminated": {"exitCode": code}},
        restart_count=2,
    )


def test_a_container_in_back_off_keeps_the_pod_running() -> None:
    assert pod_phase([], [crashed("a", 137)], "Always") == "Running"
    assert pod_phase([], [crashed("a", 1)], "OnFailure") == "Running"
    waiting_init = ContainerState("fetch", "img", state={"waiting": {"reason": "PodInitializing"}})
    assert pod_phase([waiting_init], [ContainerState("a", "img")], "Always") == "Pending"


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_ready_follows_the_readiness_verdict_and_names_unready_containers() -> None:
    web = ContainerState("web", "img", state={"running": {"startedAt": "t"}}, started=True, ready=False)
    status = pod_status("Running", [], [web], "t", "198.18.0.1")
    assert condition(status, "Ready") | {"lastTransitionTime": ""} == {
        "type": "Ready",
        "status": "False",
        "reason": "ContainersNotReady",
        "message": "containers with unready status: [web]",
        "lastTransitionTime": "",
    }
    assert status["containerStatuses"][0]["started"] is True
    assert status["podIPs"] == [{"ip": "198.18.0.1"}]
    web.ready = True
    assert condition(pod_status("Running", [], [web], "t", "198.18.0.1"), "Ready")["status"] == "True"


def test_initialized_names_the_init_containers_still_to_complete() -> None:
    failed = ContainerState("fetch", "img", state={"terminated": {"exitCode": 1, "reason": "Error"}})
    status = pod_status("Pending", [failed], [ContainerState("web", "img")], "t", "198.18.0.1")
    initialized = condition(status, "Initialized")
    assert (initialized["status"], initialized["reason"]) == ("False", "ContainersNotInitialized")
    assert initialized["message"] == "containers with incomplete status: [fetch]"


# -- addresses ----------------------------------------------------------------------------------------


def test_pod_ips_map_to_loopback_and_are_not_reused_at_once() -> None:
    addresses = PodAddresses()
    first, second = addresses.allocate(), addresses.allocate()
    assert (first, second) == ("198.18.0.1", "198.18.0.2")
    assert loopback_address(second) == "127.18.0.2"
    addresses.release(first)
    assert addresses.allocate() == "198.18.0.3"
    with pytest.raises(ValueError, match="not a local kubelet Pod IP"):
        loopback_address("10.0.0.7")


# -- logs ---------------------------------------------------------------------------------------------


def test_tail_of_counts_a_last_line_without_newline() -> None:
    assert tail_of(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert tail_of(b"a\nb\nc", 2) == b"b\nc"
    assert tail_of(b"a\nb\n", 5) == b"a\nb\n"
    assert tail_of(b"a\nb\n", 0) == b""


def test_read_tail_lines_reads_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    lines = [f"line {i} " + "x" * 100 + "\n" for i in range(2000)]
    path.write_text("".join(lines))
    data, size = read_tail_lines(path, 700)
    assert data.decode() == "".join(lines[-700:])
    assert size == path.stat().st_size


def test_query_is_read_as_the_api_server_sends_it() -> None:
    assert parse_query("follow=true&tailLines=5&previous=true") == LogQuery(True, True, 5, None)
    assert parse_query("limitBytes=10") == LogQuery(limit_bytes=10)
    with pytest.raises(BadQuery, match="timestamps is not supported"):
        parse_query("timestamps=true")
    with pytest.raises(BadQuery, match="tailLines must be an integer"):
        parse_query("tailLines=ten")


def test_follow_streams_until_the_run_ends(tmp_path: Path) -> None:
    path = tmp_path / "main.log"
    path.write_bytes(b"one\ntwo\n")
    out: list[bytes] = []
    running = threading.Event()
    running.set()

    def write(data: bytes) -> None:
        out.append(data)
        if len(out) == 1:  # the process writes more, then exits
            with path.open("ab") as handle:
                handle.write(b"three\n")
            running.clear()

    stream_log(path, LogQuery(follow=True, tail_lines=1), write, running.is_set, threading.Event())
    assert b"".join(out) == b"two\nthree\n"


def test_limit_bytes_cuts_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "main.log"
    path.write_bytes(b"0123456789\n")
    out: list[bytes] = []
    stream_log(path, LogQuery(limit_bytes=4), out.append, lambda: False, threading.Event())
    assert out == [b"0123"]
