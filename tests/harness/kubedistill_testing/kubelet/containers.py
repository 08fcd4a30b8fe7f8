"""What a kubelet decides about containers, as pure functions: environment, argv, exit codes, restart
back-off, container and Pod status."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Pod = dict[str, Any]
Lookup = Callable[[str, str, str], Mapping[str, str] | None]
"""(kind "secret"|"configmap", namespace, name) → decoded data, or None when the object does not exist."""

# What a process inherits from the test run; everything else in a container's environment is the Pod's.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "HF_HOME")
TERMINAL = ("Succeeded", "Failed")
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


class ConfigError(Exception):
    """A container cannot start yet; ``reason`` is the waiting reason a kubelet would report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, undefined ones kept, `$$` escapes `$`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def field_value(pod: Pod, path: str) -> str:
    """The value of a downward-API fieldRef such as `metadata.name` or `metadata.labels['app']`."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    subscript = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if subscript:
        return str((meta.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
        "status.podIP": status.get("podIP") or "127.0.0.1",
    }
    if path not in simple:
        raise ConfigError(
            "CreateContainerConfigError", f"fieldRef {path!r} is not supported by the local kubelet"
        )
    return str(simple[path] or "")


def _ref_value(ref: Mapping[str, Any], kind: str, namespace: str, lookup: Lookup) -> str | None:
    data = lookup(kind, namespace, ref["name"])
    label = "secret" if kind == "secret" else "configmap"
    if data is None:
        if ref.get("optional"):
            return None
        raise ConfigError("CreateContainerConfigError", f'{label} "{ref["name"]}" not found')
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(
            "CreateContainerConfigError",
            f"couldn't find key {ref['key']} in {label} {namespace}/{ref['name']}",
        )
    value: str = data[ref["key"]]
    return value


def container_env(
    pod: Pod, container: Mapping[str, Any], lookup: Lookup, base: Mapping[str, str]
) -> dict[str, str]:
    """The environment a kubelet gives this container: base, then envFrom, then env in order."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("secret", source["secretRef"])
            if "secretRef" in source
            else ("configmap", source["configMapRef"])
        )
        data = lookup(kind, namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError("CreateContainerConfigError", f'{kind} "{ref["name"]}" not found')
        env.update({source.get("prefix", "") + key: value for key, value in data.items()})
    for var in container.get("env") or []:
        if "valueFrom" not in var:
            env[var["name"]] = expand_vars(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            value = _ref_value(source["secretKeyRef"], "secret", namespace, lookup)
        elif "configMapKeyRef" in source:
            value = _ref_value(source["configMapKeyRef"], "configmap", namespace, lookup)
        elif "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        else:
            raise ConfigError(
                "CreateContainerConfigError",
                f"env {var['name']}: only secretKeyRef, configMapKeyRef and fieldRef are supported",
            )
        if value is not None:
            env[var["name"]] = value
    return env


def configmap_volume_files(source: Mapping[str, Any], data: Mapping[str, str]) -> dict[str, str]:
    """Relative path → content of a configMap volume: its `items`, else one file per key."""
    items = source.get("items")
    if not items:
        return dict(data)
    files = {}
    for item in items:
        if item["key"] not in data:
            raise ConfigError(
                "CreateContainerConfigError",
                f"configmap {source['name']} references non-existent config key: {item['key']}",
            )
        files[item["path"]] = data[item["key"]]
    return files


def remap_path(token: str, mounts: Mapping[str, Path]) -> str:
    """`token` pointed at the local directory of the mount it lies at or under (the deepest one wins);
    in a `name=value` token only the value counts, as in `--output=/tmp/out`. Others pass unchanged."""
    head, sep, value = ("", "", token) if token.startswith("/") else token.partition("=")
    roots = {mount.rstrip("/"): local for mount, local in mounts.items() if mount.rstrip("/")}
    matching = [root for root in roots if value == root or value.startswith(root + "/")]
    if not matching:
        return token
    root = max(matching, key=len)
    return f"{head}{sep}{roots[root]}{value[len(root) :]}"


def remap_paths(env: Mapping[str, str], mounts: Mapping[str, Path]) -> dict[str, str]:
    """`env` with every value at or under a mount path pointed at that mount's local directory."""
    return {key: remap_path(value, mounts) for key, value in env.items()}


def resolve_argv(
    container: Mapping[str, Any],
    env: Mapping[str, str],
    images: Mapping[str, Sequence[str]],
    commands: Mapping[str, str],
    mounts: Mapping[str, Path] | None = None,
) -> list[str]:
    """The local argv for a container: its command, or the image's mapped entrypoint, then its args.

    `env` is the container's environment as the Pod sees it (before paths are remapped): `$(VAR)` expands
    first, then each token of the container's own command and args that names a path under a volume's
    mount is pointed at the volume's local directory (the image's entrypoint is this machine's already)."""

    def local(parts: Sequence[str]) -> list[str]:
        return [remap_path(expand_vars(part, env), mounts or {}) for part in parts]

    args = local(container.get("args") or [])
    command = local(container.get("command") or [])
    if command:
        return [commands.get(command[0], command[0]), *command[1:], *args]
    image = container.get("image", "")
    matches = [prefix for prefix in images if image.startswith(prefix)]
    if not matches:
        raise ConfigError(
            "ErrImageNeverPull",
            f'image "{image}" has no local command: give the container a command or map the image in the kubelet',
        )
    return [*images[max(matches, key=len)], *args]


def exit_code(returncode: int) -> int:
    """Popen's returncode as a container exit code: death by signal N is 128 + N, as in a shell."""
    return 128 - returncode if returncode < 0 else returncode


def termination_message(written: str, log_text: str, policy: str, code: int) -> str:
    if written or policy != "FallbackToLogsOnError" or code == 0:
        return written[:MAX_TERMINATION_MESSAGE]
    tail = "\n".join(log_text.splitlines()[-FALLBACK_LOG_LINES:])
    return tail[-FALLBACK_LOG_BYTES:]


def should_restart(policy: str, code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and code != 0)


def restart_delay(crashes: int, base: float, cap: float) -> float:
    """The kubelet's back-off before restarting after the `crashes`-th exit in a row: doubling, capped."""
    return float(min(base * 2 ** max(crashes - 1, 0), cap))


def crash_loop_message(delay: float, container: str, pod: Pod) -> str:
    meta = pod["metadata"]
    return (
        f"back-off {delay:g}s restarting failed container={container} "
        f"pod={meta['name']}_{meta['namespace']}({meta['uid']})"
    )


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = {key: environ[key] for key in INHERITED_ENV if key in environ}
    if "PYTHONPATH" in env:
        # Containers start in their own directory: relative entries would point elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p
        )
    return env


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------------


@dataclass
class ContainerState:
    """One container's status, in the shape of `containerStatuses[]`.

    ``started`` and ``ready`` are what the startup and readiness probes last decided (both follow the
    process when the container has no such probe)."""

    name: str
    image: str
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    pid: int | None = None
    started: bool = False
    ready: bool = False

    @property
    def kind(self) -> str:
        return next(iter(self.state))

    @property
    def stopped(self) -> bool:
        """Terminated, or waiting to be restarted after it terminated (the kubelet counts both as stopped)."""
        return self.kind == "terminated" or (self.kind == "waiting" and "terminated" in self.last_state)

    def exit_code(self) -> int | None:
        terminated = self.state.get("terminated") or self.last_state.get("terminated")
        return None if terminated is None else int(terminated["exitCode"])

    def as_status(self) -> dict[str, Any]:
        running = self.kind == "running"
        # Strategic merge keeps keys a patch does not mention: the states we left are nulled explicitly.
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None, **self.state}
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": f"local://{self.pid}" if self.pid else "",
            "started": running and self.started,
            "ready": running and self.ready,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state,
        }


def pod_phase(init: Sequence[ContainerState], main: Sequence[ContainerState], restart_policy: str) -> str:
    """The kubelet's getPhase: a container waiting to restart counts as stopped, not as pending."""
    if restart_policy == "Never" and any(c.kind == "terminated" and c.exit_code() != 0 for c in init):
        return "Failed"
    if not main or any(c.kind == "waiting" and not c.stopped for c in main):
        return "Pending"
    if any(c.kind == "running" for c in main):
        return "Running"
    if restart_policy == "Always":
        return "Running"
    failed = any(c.exit_code() != 0 for c in main)
    if not failed and all(c.kind == "terminated" for c in main):
        return "Succeeded"
    return "Failed" if failed and restart_policy == "Never" else "Running"


def pod_status(
    phase: str,
    init: Sequence[ContainerState],
    main: Sequence[ContainerState],
    started_at: str,
    pod_ip: str,
) -> dict[str, Any]:
    stamp = now()
    pending_init = [c.name for c in init if not (c.kind == "terminated" and c.exit_code() == 0)]
    # As the kubelet: initialized once a container has started, or when the Pod succeeded.
    main_started = any(c.kind != "waiting" or c.last_state for c in main)
    initialized = not pending_init or main_started or phase == "Succeeded"
    unready = [c.name for c in main if not (c.kind == "running" and c.ready)]
    ready = phase == "Running" and not unready

    def condition(kind: str, ok: bool, reason: str | None = None, message: str = "") -> dict[str, Any]:
        # Strategic merge keeps what a patch leaves out: a reason and message that no longer apply are nulled.
        return {
            "type": kind,
            "status": "True" if ok else "False",
            "lastTransitionTime": stamp,
            "reason": None if ok else reason,
            "message": None if ok or not message else message,
        }

    not_ready = "PodCompleted" if phase in TERMINAL else "ContainersNotReady"
    unready_message = "" if phase in TERMINAL else f"containers with unready status: [{' '.join(unready)}]"
    return {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": started_at,
        "conditions": [
            condition("PodReadyToStartContainers", phase not in TERMINAL),
            condition(
                "Initialized",
                initialized,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(pending_init)}]",
            ),
            condition("Ready", ready, not_ready, unready_message),
            condition("ContainersReady", ready, not_ready, unready_message),
            condition("PodScheduled", True),
        ],
        "initContainerStatuses": [c.as_status() for c in init],
        "containerStatuses": [c.as_status() for c in main],
    }
