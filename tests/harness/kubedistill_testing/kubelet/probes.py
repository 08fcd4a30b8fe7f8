"""Probes and lifecycle hooks: `httpGet`, `tcpSocket` and `exec` (and a preStop `sleep`), with the
kubelet's defaults and thresholds.

A probe's timing and thresholds are parsed once (`Probe.from_spec`); `ProbeCounter` turns single results
into the probe's verdict; `run_action` performs one check against the Pod's own address; a `Prober`
thread repeats it every `periodSeconds` while its container runs.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubedistill_testing.kubelet.containers import ConfigError

PROBE_USER_AGENT = "kube-probe/local"


@dataclass(frozen=True)
class HttpGet:
    port: int
    path: str = "/"
    host: str | None = None
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TcpSocket:
    port: int
    host: str | None = None


@dataclass(frozen=True)
class Exec:
    command: tuple[str, ...]


@dataclass(frozen=True)
class Sleep:
    seconds: float


Action = HttpGet | TcpSocket | Exec | Sleep


def container_port(port: int | str, container: Mapping[str, Any]) -> int:
    """A probe's port: a number, or the name of one of the container's `ports`."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for entry in container.get("ports") or []:
        if entry.get("name") == port:
            return int(entry["containerPort"])
    raise ConfigError(
        "CreateContainerConfigError", f"container {container['name']} has no port named {port!r}"
    )


def handler_action(handler: Mapping[str, Any], container: Mapping[str, Any]) -> Action:
    """The action of a probe or lifecycle handler spec."""
    if "httpGet" in handler:
        get = handler["httpGet"]
        headers = tuple((h["name"], h["value"]) for h in get.get("httpHeaders") or [])
        return HttpGet(
            container_port(get["port"], container),
            get.get("path") or "/",
            get.get("host") or None,
            get.get("scheme") or "HTTP",
            headers,
        )
    if "tcpSocket" in handler:
        tcp = handler["tcpSocket"]
        return TcpSocket(container_port(tcp["port"], container), tcp.get("host") or None)
    if "exec" in handler:
        return Exec(tuple(handler["exec"].get("command") or ()))
    if "sleep" in handler:
        return Sleep(float(handler["sleep"]["seconds"]))
    raise ConfigError(
        "CreateContainerConfigError",
        f"container {container['name']}: only httpGet, tcpSocket, exec and sleep handlers are supported "
        f"by the local kubelet, not {sorted(handler)}",
    )


@dataclass(frozen=True)
class Probe:
    """A probe spec with the API's defaults applied (periodSeconds 10, timeoutSeconds 1, thresholds 1/3)."""

    action: Action
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], container: Mapping[str, Any]) -> Probe:
        return cls(
            handler_action(spec, container),
            float(spec.get("initialDelaySeconds") or 0),
            float(spec.get("periodSeconds") or 10),
            float(spec.get("timeoutSeconds") or 1),
            int(spec.get("successThreshold") or 1),
            int(spec.get("failureThreshold") or 3),
        )


@dataclass
class ProbeCounter:
    """A probe's verdict: it changes only after `successThreshold` (`failureThreshold`) results in a row.

    ``result`` starts as the kubelet's initial value: None (unknown) for startup and readiness probes,
    True for liveness probes."""

    success_threshold: int
    failure_threshold: int
    result: bool | None = None
    last: bool | None = None
    in_a_row: int = 0

    def observe(self, ok: bool) -> bool | None:
        self.in_a_row = self.in_a_row + 1 if ok == self.last else 1
        self.last = ok
        if self.in_a_row >= (self.success_threshold if ok else self.failure_threshold):
            self.result = ok
        return self.result


@dataclass(frozen=True)
class Target:
    """Where a probe or hook acts: the Pod's own address, and the container's environment and directory."""

    host: str
    env: Mapping[str, str]
    cwd: str
    commands: Mapping[str, str]
    # The argv prefix that runs an exec action inside the container's mount namespace (nsenter), if any.
    enter: tuple[str, ...] = ()


def run_action(action: Action, target: Target, timeout: float) -> tuple[bool, str]:
    """Run one check or hook; (succeeded, why not)."""
    try:
        if isinstance(action, HttpGet):
            return _http_get(action, target.host, timeout)
        if isinstance(action, TcpSocket):
            with socket.create_connection((action.host or target.host, action.port), timeout=timeout):
                return True, ""
        if isinstance(action, Sleep):
            threading.Event().wait(min(action.seconds, timeout))
            return True, ""
        return _exec(action, target, timeout)
    except (OSError, http.client.HTTPException) as err:
        return False, f"{type(err).__name__}: {err}"


def _http_get(action: HttpGet, host: str, timeout: float) -> tuple[bool, str]:
    address = action.host or host
    if action.scheme.upper() == "HTTPS":
        # As the kubelet does: probes do not verify the serving certificate.
        context = ssl._create_unverified_context()
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            address, action.port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(address, action.port, timeout=timeout)
    try:
        headers = {"User-Agent": PROBE_USER_AGENT, "Accept": "*/*", **dict(action.headers)}
        conn.request("GET", action.path, headers=headers)
        status = conn.getresponse().status
    finally:
        conn.close()
    if 200 <= status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {status}"


def _exec(action: Exec, target: Target, timeout: float) -> tuple[bool, str]:
    if not action.command:
        return False, "exec: empty command"
    argv = [*target.enter, target.commands.get(action.command[0], action.command[0]), *action.command[1:]]
    proc = subprocess.Popen(
        argv, env=dict(target.env), cwd=target.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return False, f"command timed out after {timeout:g}s"
    text = output.decode("utf-8", errors="replace").strip()
    if proc.returncode == 0:
        return True, ""
    return False, f"exit code {proc.returncode}" + (f": {text[-200:]}" if text else "")


class Prober(threading.Thread):
    """Runs one probe of one container run until stopped; `result` is the probe's current verdict.

    Readiness and liveness probes wait for `gate` (the startup probe's success) before their first check;
    `on_failure` hears of the first failed check of each run of failures."""

    def __init__(
        self,
        kind: str,
        probe: Probe,
        target: Target,
        *,
        gate: threading.Event | None = None,
        name: str = "",
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name=f"probe-{kind}-{name}", daemon=True)
        self.kind = kind
        self.probe = probe
        self.target = target
        self.gate = gate
        self.on_failure = on_failure
        initial = True if kind == "liveness" else None
        self.counter = ProbeCounter(probe.success_threshold, probe.failure_threshold, initial)
        self.message = ""
        self.passed = threading.Event()  # set once the verdict is success (the startup probe's gate)
        # initialDelaySeconds counts from the container's start, as on a node, not from the gate opening.
        self._first_check_at = time.monotonic() + probe.initial_delay
        self._stop_event = threading.Event()

    @property
    def result(self) -> bool | None:
        return self.counter.result

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        if self.gate is not None:
            while not self.gate.wait(0.05):
                if self._stop_event.is_set():
                    return
        if self._stop_event.wait(max(0.0, self._first_check_at - time.monotonic())):
            return
        while not self._stop_event.is_set():
            ok, why = run_action(self.probe.action, self.target, self.probe.timeout)
            if self._stop_event.is_set():
                return
            self.message = "" if ok else why
            verdict = self.counter.observe(ok)
            if not ok and self.counter.in_a_row == 1 and self.on_failure is not None:
                self.on_failure(f"{self.kind.capitalize()} probe failed: {why}")  # once per failing streak
            if verdict:
                self.passed.set()
                if self.kind == "startup":
                    return  # a startup probe stops once it has succeeded
            self._stop_event.wait(self.probe.period)
