"""A local kubelet: one Node whose Pods run as processes on this machine.

It does what the control plane needs from a kubelet and a scheduler, and nothing more:

- registers one Node with a configurable capacity (``nvidia.com/gpu`` defaults to 0);
- binds unscheduled Pods that fit (node selector, resource requests); a Pod that does not fit stays
  Pending with ``PodScheduled=False``, reason ``Unschedulable`` and the scheduler's message, e.g.
  ``0/1 nodes are available: 1 Insufficient nvidia.com/gpu.``;
- runs each container as a process in its own process group. ``command`` + ``args`` run as given, except
  that ``python``/``python3`` mean this interpreter (as an image's python is the image's own environment).
  A container without ``command`` runs the argv prefix mapped to the longest matching image prefix
  (``images``), followed by its ``args``. An unmapped image leaves the container waiting with
  ``ErrImageNeverPull``;
- builds the environment a kubelet would: ``env`` (with ``$(VAR)`` expansion), ``envFrom``, and
  ``valueFrom`` secretKeyRef / configMapKeyRef / fieldRef read from the API;
- gives each Pod its ServiceAccount's identity: a token from the TokenRequest API bound to the Pod, the
  cluster CA and the namespace in a per-pod directory named by ``KUBEDISTILL_SERVICEACCOUNT_DIR``, and
  ``KUBERNETES_SERVICE_HOST``/``PORT`` pointing at the API server. (A real kubelet mounts the same three
  files at /var/run/secrets/kubernetes.io/serviceaccount; local processes cannot see that path.)
- maps ``terminationMessagePath`` to a per-container file named by ``KUBEDISTILL_TERMINATION_LOG``: stage
  programs write their termination message there when that variable is set;
- writes Pod status (Pending → Running → Succeeded/Failed, container states with exit code, reason,
  termination message, start/finish times) so the real Job controller counts successes and failures;
- keeps each container's output in ``log_path(namespace, pod, container)``;
- on Pod deletion stops the process group (SIGTERM, then SIGKILL after the grace period, capped at
  ``max_grace_seconds``), reports the Pod Failed and removes it, as a kubelet finishes a graceful delete.

- writes each ``configMap`` volume (its ``items``, else every key) into a per-pod directory, and points
  env values naming a path under a container's ``mountPath`` for it there (local processes cannot see
  the mount path itself): a dataset or an invocation mounted from a ConfigMap is read as in a cluster.

Other volumes, probes, hostNetwork and security contexts are ignored.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity

log = logging.getLogger(__name__)

Pod = dict[str, Any]
Lookup = Callable[[str, str, str], Mapping[str, str] | None]
"""(kind "secret"|"configmap", namespace, name) → decoded data, or None when the object does not exist."""

DEFAULT_IMAGES: dict[str, list[str]] = {
    "ghcr.io/kubedistill/trainer": [sys.executable, "-m", "kubedistill_trainer"],
}
DEFAULT_COMMANDS: dict[str, str] = {"python": sys.executable, "python3": sys.executable}
DEFAULT_CAPACITY: dict[str, str] = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "0"}
# What a process inherits from the test run; everything else in a container's environment is the Pod's.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "HF_HOME")
TERMINAL = ("Succeeded", "Failed")
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
RESTART_BACKOFF_MAX_S = 10.0
# The client would send a dict as a JSON patch; conditions and containerStatuses merge by key this way.
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class ConfigError(Exception):
    """A container cannot start yet; ``reason`` is the waiting reason a kubelet would report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------------
# Pure helpers: scheduling
# ---------------------------------------------------------------------------------------------------


def pod_requests(pod: Pod) -> dict[str, Decimal]:
    """Effective requests: the sum over containers, or the largest init container's if that is larger."""
    spec = pod.get("spec", {})
    total: dict[str, Decimal] = {"pods": Decimal(1)}
    for container in spec.get("containers", []):
        for name, value in (container.get("resources", {}).get("requests") or {}).items():
            total[name] = total.get(name, Decimal(0)) + parse_quantity(value)
    for container in spec.get("initContainers", []):
        for name, value in (container.get("resources", {}).get("requests") or {}).items():
            total[name] = max(total.get(name, Decimal(0)), parse_quantity(value))
    return total


def insufficient(
    requests: Mapping[str, Decimal], allocatable: Mapping[str, Decimal], used: Mapping[str, Decimal]
) -> list[str]:
    """Resources the node lacks for these requests, sorted (the scheduler's order)."""
    short = []
    for name, amount in requests.items():
        if amount <= 0:
            continue
        if amount + used.get(name, Decimal(0)) > allocatable.get(name, Decimal(0)):
            short.append(name)
    return sorted(short)


def selector_matches(pod: Pod, node_labels: Mapping[str, str]) -> bool:
    selector = pod.get("spec", {}).get("nodeSelector") or {}
    return all(node_labels.get(key) == value for key, value in selector.items())


def unschedulable_message(short: Sequence[str], selector_ok: bool) -> str:
    reasons = [f"1 Insufficient {name}" for name in short]
    if not selector_ok:
        reasons = ["1 node(s) didn't match Pod's node affinity/selector"]
    return f"0/1 nodes are available: {', '.join(reasons)}."


def scheduled_condition(pod: Pod) -> Mapping[str, Any] | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled":
            return dict(condition)
    return None


# ---------------------------------------------------------------------------------------------------
# Pure helpers: containers
# ---------------------------------------------------------------------------------------------------

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
    return data[ref["key"]]


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


def remap_paths(env: Mapping[str, str], mounts: Mapping[str, Path]) -> dict[str, str]:
    """`env` with every value at or under a mount path pointed at that mount's local directory."""
    out = dict(env)
    for key, value in env.items():
        for mount, local in mounts.items():
            root = mount.rstrip("/")
            if value == root or value.startswith(root + "/"):
                out[key] = str(local) + value[len(root) :]
    return out


def resolve_argv(
    container: Mapping[str, Any],
    env: Mapping[str, str],
    images: Mapping[str, Sequence[str]],
    commands: Mapping[str, str],
) -> list[str]:
    """The local argv for a container: its command, or the image's mapped entrypoint, then its args."""
    args = [expand_vars(arg, env) for arg in container.get("args") or []]
    command = [expand_vars(part, env) for part in container.get("command") or []]
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


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    """One container's status, in the shape of `containerStatuses[]`."""

    name: str
    image: str
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    pid: int | None = None

    @property
    def kind(self) -> str:
        return next(iter(self.state))

    def as_status(self) -> dict[str, Any]:
        running = self.kind == "running"
        # Strategic merge keeps keys a patch does not mention: the states we left are nulled explicitly.
        state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None, **self.state}
        return {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "containerID": f"local://{self.pid}" if self.pid else "",
            "started": running,
            "ready": running,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state,
        }


def pod_phase(init: Sequence[ContainerState], main: Sequence[ContainerState], restart_policy: str) -> str:
    if (
        any(c.kind == "terminated" and c.state["terminated"]["exitCode"] != 0 for c in init)
        and restart_policy == "Never"
    ):
        return "Failed"
    if not main or any(c.kind == "waiting" for c in main):
        return "Pending"
    if all(c.kind == "terminated" for c in main):
        if restart_policy == "Always":
            return "Running"
        failed = any(c.state["terminated"]["exitCode"] != 0 for c in main)
        return "Failed" if failed and restart_policy == "Never" else "Succeeded" if not failed else "Running"
    return "Running"


def pod_status(
    phase: str, init: Sequence[ContainerState], main: Sequence[ContainerState], started_at: str
) -> dict[str, Any]:
    stamp = now()
    initialized = all(c.kind == "terminated" for c in init) or phase in TERMINAL
    ready = phase == "Running" and all(c.kind == "running" for c in main)

    def condition(kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
        entry = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": stamp}
        if reason and not ok:
            entry["reason"] = reason
        return entry

    not_ready = "PodCompleted" if phase in TERMINAL else "ContainersNotReady"
    return {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "startTime": started_at,
        "conditions": [
            condition("PodReadyToStartContainers", phase not in TERMINAL),
            condition("Initialized", initialized, "ContainersNotInitialized"),
            condition("Ready", ready, not_ready),
            condition("ContainersReady", ready, not_ready),
            condition("PodScheduled", True),
        ],
        "initContainerStatuses": [c.as_status() for c in init],
        "containerStatuses": [c.as_status() for c in main],
    }


def should_restart(policy: str, code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and code != 0)


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = {key: environ[key] for key in INHERITED_ENV if key in environ}
    if "PYTHONPATH" in env:
        # Containers start in their own directory: relative entries would point elsewhere.
        env["PYTHONPATH"] = os.pathsep.join(
            str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p
        )
    return env


# ---------------------------------------------------------------------------------------------------
# The kubelet
# ---------------------------------------------------------------------------------------------------


class LocalKubelet:
    """Runs the Pods of one Node as local processes. Use as a context manager, or start() / stop()."""

    def __init__(
        self,
        api: client.ApiClient,
        root: Path,
        *,
        node_name: str = "kubedistill-local",
        capacity: Mapping[str, str] | None = None,
        node_labels: Mapping[str, str] | None = None,
        images: Mapping[str, Sequence[str]] | None = None,
        commands: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        max_grace_seconds: float = 5.0,
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.root = root.resolve()
        self.node_name = node_name
        self.capacity = {**DEFAULT_CAPACITY, **(capacity or {})}
        self.node_labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            **(node_labels or {}),
        }
        self.images = dict(DEFAULT_IMAGES if images is None else images)
        self.commands = dict(DEFAULT_COMMANDS if commands is None else commands)
        self.base_env = {**inherited_env(os.environ), **(extra_env or {})}
        self.max_grace_seconds = max_grace_seconds
        server = urllib.parse.urlsplit(api.configuration.host)
        self.api_host, self.api_port = server.hostname or "127.0.0.1", server.port or 443
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Owned by the loop thread only: no locks.
        self._pods: dict[str, Pod] = {}
        self._workers: dict[str, _PodWorker] = {}
        self._finished: set[str] = set()
        self._delete_sent: set[str] = set()

    @classmethod
    def from_kubeconfig(cls, path: Path, root: Path, **kwargs: Any) -> LocalKubelet:
        return cls(config.new_client_from_config(config_file=str(path)), root, **kwargs)

    # -- public ---------------------------------------------------------------------------------------

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return self.root / "logs" / namespace / pod / f"{container}.log"

    def container_pids(self) -> list[int]:
        """Pids of the container processes running now (tests use it to check that nothing leaks)."""
        return [
            p.pid
            for w in list(self._workers.values())
            for p in list(w._processes.values())
            if p.poll() is None
        ]

    def start(self) -> LocalKubelet:
        self._register_node()
        for target, name in ((self._watch_loop, "kubelet-watch"), (self._sync_loop, "kubelet-sync")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Kill every container process and stop the threads; Pods are left as they are in the API."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        workers = list(self._workers.values())
        for worker in workers:
            worker.kill(grace=0, report=False)
        for worker in workers:
            worker.join(timeout=10)

    def __enter__(self) -> LocalKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- node -----------------------------------------------------------------------------------------

    def allocatable(self) -> dict[str, Decimal]:
        return {name: parse_quantity(value) for name, value in self.capacity.items()}

    def _register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": self.node_labels},
        }
        try:
            self.core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        stamp = now()
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node_name}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local kubelet is ready",
                 "lastHeartbeatTime": stamp, "lastTransitionTime": stamp},
            ],
            "nodeInfo": {"kubeletVersion": "local", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "local://processes", "osImage": "local",
                         "kernelVersion": os.uname().release, "kubeProxyVersion": "", "machineID": "",
                         "systemUUID": "", "bootID": ""},
        }  # fmt: skip
        self.core.patch_node_status(self.node_name, {"status": status}, _content_type=STRATEGIC_MERGE)

    # -- threads --------------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listing = json.loads(self.core.list_pod_for_all_namespaces(_preload_content=False).data)
                    resource_version = listing["metadata"]["resourceVersion"]
                    self._events.put(("relist", listing["items"]))
                # A short server-side timeout bounds how long stop() waits for this thread.
                for event in watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=resource_version,
                    timeout_seconds=2,
                    allow_watch_bookmarks=True,
                ):
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        resource_version = None
                        break
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._events.put((event["type"], obj))
                    if self._stop.is_set():
                        break
            except Exception as err:  # any failure means: relist and carry on
                if not self._stop.is_set():
                    log.debug("pod watch failed, relisting: %s", err)
                resource_version = None
                self._stop.wait(0.5)

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kind, payload = self._events.get(timeout=0.5)
            except queue.Empty:
                kind, payload = "resync", None
            try:
                self._handle(kind, payload)
            except Exception:
                log.exception("local kubelet: handling %s failed", kind)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "relist":
            seen = {pod["metadata"]["uid"]: pod for pod in payload}
            for uid in set(self._pods) - set(seen):
                self._forget(uid)
            self._pods = seen
        elif kind == "DELETED":
            self._forget(payload["metadata"]["uid"])
            return
        elif kind in ("ADDED", "MODIFIED"):
            self._pods[payload["metadata"]["uid"]] = payload
        elif kind == "worker-done":
            self._workers.pop(payload, None)
            self._finished.add(payload)
        for pod in sorted(self._pods.values(), key=lambda p: p["metadata"].get("creationTimestamp", "")):
            self._reconcile(pod)

    def _forget(self, uid: str) -> None:
        self._pods.pop(uid, None)
        worker = self._workers.get(uid)
        if worker:
            worker.kill(grace=0, report=False)
        self._finished.discard(uid)
        self._delete_sent.discard(uid)

    def _reconcile(self, pod: Pod) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        node = spec.get("nodeName")
        if not node:
            if spec.get("schedulerName", "default-scheduler") == "default-scheduler" and not meta.get(
                "deletionTimestamp"
            ):
                self._schedule(pod)
            return
        if node != self.node_name:
            return
        worker = self._workers.get(uid)
        if meta.get("deletionTimestamp"):
            grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), self.max_grace_seconds)
            if worker:
                worker.kill(grace=grace, report=True)
            elif uid not in self._delete_sent:
                self._delete_sent.add(uid)
                self._delete_now(meta["namespace"], meta["name"], uid)
            return
        if (
            worker is None
            and uid not in self._finished
            and pod.get("status", {}).get("phase") not in TERMINAL
        ):
            worker = _PodWorker(self, pod)
            self._workers[uid] = worker
            worker.start()

    def _schedule(self, pod: Pod) -> None:
        used: dict[str, Decimal] = {}
        for other in self._pods.values():
            if (
                other["spec"].get("nodeName") == self.node_name
                and other.get("status", {}).get("phase") not in TERMINAL
            ):
                for name, amount in pod_requests(other).items():
                    used[name] = used.get(name, Decimal(0)) + amount
        selector_ok = selector_matches(pod, self.node_labels)
        short = insufficient(pod_requests(pod), self.allocatable(), used)
        meta = pod["metadata"]
        if selector_ok and not short:
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
            }
            try:
                # Raw response: the generated V1Binding model rejects the Status object the API returns.
                self.core.create_namespaced_pod_binding(
                    meta["name"], meta["namespace"], binding, _preload_content=False
                )
            except ApiException as err:
                if err.status not in (404, 409):
                    raise
                return
            # Count it as used, and start it, before the watch reports the binding.
            pod["spec"]["nodeName"] = self.node_name
            self._reconcile(pod)
            return
        message = unschedulable_message(short, selector_ok)
        current = scheduled_condition(pod)
        if current and current.get("reason") == "Unschedulable" and current.get("message") == message:
            return
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastTransitionTime": now()}  # fmt: skip
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(
                meta["name"],
                meta["namespace"],
                {"status": {"conditions": [condition]}},
                _content_type=STRATEGIC_MERGE,
            )
            pod.setdefault("status", {})["conditions"] = [condition]

    # -- API helpers used by workers ------------------------------------------------------------------

    def _delete_now(self, namespace: str, name: str, uid: str) -> None:
        with contextlib.suppress(ApiException):
            # With a body the API server ignores the gracePeriodSeconds query parameter: it goes in the body.
            body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
            self.core.delete_namespaced_pod(name, namespace, body=body)

    def _lookup(self, kind: str, namespace: str, name: str) -> Mapping[str, str] | None:
        try:
            if kind == "secret":
                data = self.core.read_namespaced_secret(name, namespace).data or {}
                return {key: _b64(value) for key, value in data.items()}
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _service_account_dir(self, pod: Pod, directory: Path) -> Path | None:
        """Write a TokenRequest token bound to the Pod, the CA and the namespace; None if not mounted."""
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        account = spec.get("serviceAccountName") or "default"
        try:
            response = self.core.create_namespaced_service_account_token(
                account, meta["namespace"], request, _preload_content=False
            )
        except ApiException as err:
            raise ConfigError(
                "CreateContainerConfigError", f"token for serviceaccount {account}: {err.reason}"
            ) from err
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(json.loads(response.data)["status"]["token"])
        (directory / "namespace").write_text(meta["namespace"])
        ca_file = self.api.configuration.ssl_ca_cert
        if ca_file:
            shutil.copyfile(ca_file, directory / "ca.crt")
        return directory

    def _patch_status(self, pod: Pod, status: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(
                meta["name"], meta["namespace"], {"status": status}, _content_type=STRATEGIC_MERGE
            )
        except ApiException as err:
            if err.status != 404:
                log.warning("local kubelet: status of %s/%s: %s", meta["namespace"], meta["name"], err.reason)


def _b64(value: str) -> str:
    return base64.b64decode(value).decode("utf-8", errors="replace")


@dataclass
class _Running:
    state: ContainerState
    proc: subprocess.Popen[bytes] | None  # None: the process could not be started
    termination_file: Path
    log_file: Path
    message_policy: str


class _PodWorker(threading.Thread):
    """Runs one Pod: init containers in order, then all containers, then the final status."""

    def __init__(self, kubelet: LocalKubelet, pod: Pod) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.pod = pod
        self.dir = kubelet.root / "pods" / meta["uid"]
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        self.init = [
            ContainerState(c["name"], c.get("image", "")) for c in pod["spec"].get("initContainers") or []
        ]
        self.main = [ContainerState(c["name"], c.get("image", "")) for c in pod["spec"]["containers"]]
        self.started_at = now()
        self._killed = threading.Event()
        self._grace = 0.0
        self._report = True
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._last_status: dict[str, Any] | None = None

    def kill(self, grace: float, report: bool) -> None:
        self._grace = grace
        self._report = self._report and report
        self._killed.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("local kubelet: pod %s failed unexpectedly", self.name)
        finally:
            self._kill_all(0)
            self.kubelet._events.put(("worker-done", self.pod["metadata"]["uid"]))

    # -- phases ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._push()
        prepared = self._prepare()
        if prepared is None:
            return self._finish_deleted()
        specs = {
            c["name"]: c
            for c in [*(self.pod["spec"].get("initContainers") or []), *self.pod["spec"]["containers"]]
        }
        for state in self.init:
            if not self._run_group([state], specs, prepared) or self._killed.is_set():
                break
        else:
            self._run_group(self.main, specs, prepared)
        if self._killed.is_set():
            return self._finish_deleted()
        self._push()

    def _prepare(self) -> dict[str, tuple[list[str], dict[str, str]]] | None:
        """argv and env per container; retried every second while config is missing, as a kubelet does."""
        while not self._killed.is_set():
            try:
                return self._resolve()
            except ConfigError as err:
                for state in [*self.init, *self.main]:
                    state.state = {"waiting": {"reason": err.reason, "message": err.message}}
                self._push()
            except ApiException as err:
                log.warning("local kubelet: preparing %s: %s", self.name, err.reason)
            self._killed.wait(1.0)
        return None

    def _resolve(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        kubelet, meta = self.kubelet, self.pod["metadata"]
        base = {
            **kubelet.base_env,
            "HOSTNAME": meta["name"],
            "KUBERNETES_SERVICE_HOST": kubelet.api_host,
            "KUBERNETES_SERVICE_PORT": str(kubelet.api_port),
        }
        account_dir = kubelet._service_account_dir(self.pod, self.dir / "serviceaccount")
        volumes = self._configmap_volumes()
        resolved = {}
        for container in [*(self.pod["spec"].get("initContainers") or []), *self.pod["spec"]["containers"]]:
            mounts = {
                m["mountPath"]: volumes[m["name"]]
                for m in container.get("volumeMounts") or []
                if m["name"] in volumes
            }
            env = remap_paths(container_env(self.pod, container, kubelet._lookup, base), mounts)
            if account_dir:
                env["KUBEDISTILL_SERVICEACCOUNT_DIR"] = str(account_dir)
            env["KUBEDISTILL_TERMINATION_LOG"] = str(self.dir / container["name"] / "termination-log")
            resolved[container["name"]] = (
                resolve_argv(container, env, kubelet.images, kubelet.commands),
                env,
            )
        return resolved

    def _configmap_volumes(self) -> dict[str, Path]:
        """Write the Pod's configMap volumes under its directory; volume name → local directory."""
        namespace = self.pod["metadata"]["namespace"]
        written = {}
        for volume in self.pod["spec"].get("volumes") or []:
            source = volume.get("configMap")
            if source is None:
                continue
            data = self.kubelet._lookup("configmap", namespace, source["name"])
            if data is None and not source.get("optional"):
                raise ConfigError("CreateContainerConfigError", f'configmap "{source["name"]}" not found')
            directory = self.dir / "volumes" / volume["name"]
            for relative, content in configmap_volume_files(source, data or {}).items():
                path = directory / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content, encoding="utf-8")
            directory.mkdir(parents=True, exist_ok=True)
            written[volume["name"]] = directory
        return written

    def _run_group(
        self,
        states: Sequence[ContainerState],
        specs: Mapping[str, Mapping[str, Any]],
        prepared: Mapping[str, tuple[list[str], dict[str, str]]],
    ) -> bool:
        """Run containers together until all are done for good (or the Pod is deleted); True if all exit 0."""
        is_init = states is not self.main
        # Init containers are retried unless the Pod never restarts; Always means OnFailure for them.
        policy = (
            ("Never" if self.restart_policy == "Never" else "OnFailure") if is_init else self.restart_policy
        )
        running = {s.name: self._start(s, specs[s.name], prepared[s.name]) for s in states}
        self._push()
        restart_at: dict[str, float] = {}
        while (running or restart_at) and not self._killed.is_set():
            for name, run in list(running.items()):
                if run.proc is not None and run.proc.poll() is None:
                    continue
                del running[name]
                code = self._record_exit(run)
                if should_restart(policy, code):
                    delay = min(2.0**run.state.restart_count, RESTART_BACKOFF_MAX_S)
                    restart_at[name] = time.monotonic() + delay
                self._push()
            for name, when in list(restart_at.items()):
                if time.monotonic() >= when:
                    del restart_at[name]
                    state = next(s for s in states if s.name == name)
                    state.last_state, state.restart_count = dict(state.state), state.restart_count + 1
                    running[name] = self._start(state, specs[name], prepared[name])
                    self._push()
            self._killed.wait(0.05)
        if self._killed.is_set():
            self._kill_all(self._grace)
            for run in running.values():
                self._record_exit(run)
            return False
        return all(s.kind == "terminated" and s.state["terminated"]["exitCode"] == 0 for s in states)

    def _start(
        self, state: ContainerState, spec: Mapping[str, Any], prepared: tuple[list[str], dict[str, str]]
    ) -> _Running:
        argv, env = prepared
        meta = self.pod["metadata"]
        log_file = self.kubelet.log_path(meta["namespace"], meta["name"], state.name)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        termination_file = Path(env["KUBEDISTILL_TERMINATION_LOG"])
        termination_file.parent.mkdir(parents=True, exist_ok=True)
        termination_file.write_text("")
        workdir = spec.get("workingDir")
        cwd = workdir if workdir and Path(workdir).is_dir() else str(termination_file.parent)
        policy = spec.get("terminationMessagePolicy", "File")
        started = now()
        try:
            with log_file.open("ab") as out:
                proc = subprocess.Popen(
                    argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
        except OSError as err:
            # What a runtime reports when the entrypoint cannot be executed.
            state.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(err),
                                          "startedAt": started, "finishedAt": now()}}  # fmt: skip
            return _Running(state, None, termination_file, log_file, policy)
        self._processes[state.name] = proc
        state.pid = proc.pid
        state.state = {"running": {"startedAt": started}}
        return _Running(state, proc, termination_file, log_file, policy)

    def _record_exit(self, run: _Running) -> int:
        if run.proc is None:  # StartError: recorded when it happened
            return int(run.state.state["terminated"]["exitCode"])
        code = exit_code(run.proc.wait())
        self._processes.pop(run.state.name, None)
        written = _read(run.termination_file, MAX_TERMINATION_MESSAGE)
        log_tail = _read_tail(run.log_file, FALLBACK_LOG_BYTES * 4) if not written and code else ""
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": run.state.state.get("running", {}).get("startedAt", self.started_at),
            "finishedAt": now(),
            "containerID": f"local://{run.state.pid}",
        }
        message = termination_message(written, log_tail, run.message_policy, code)
        if message:
            terminated["message"] = message
        run.state.state = {"terminated": terminated}
        return code

    def _kill_all(self, grace: float) -> None:
        procs = [p for p in self._processes.values() if p.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _finish_deleted(self) -> None:
        """A Pod deleted while it ran ends Failed (as on a kubelet since 1.27), then its object is removed."""
        if not self._report:
            return
        phase = pod_phase(self.init, self.main, self.restart_policy)
        for state in [*self.init, *self.main]:
            if state.kind != "terminated":
                state.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                              "message": "The container was stopped because the pod was deleted",
                                              "startedAt": self.started_at, "finishedAt": now()}}  # fmt: skip
        self._push(phase=phase if phase in TERMINAL else "Failed")
        meta = self.pod["metadata"]
        self.kubelet._delete_now(meta["namespace"], meta["name"], meta["uid"])

    def _push(self, phase: str | None = None) -> None:
        phase = phase or pod_phase(self.init, self.main, self.restart_policy)
        status = pod_status(phase, self.init, self.main, self.started_at)
        comparable = {**status, "conditions": [{**c, "lastTransitionTime": ""} for c in status["conditions"]]}
        if comparable == self._last_status:
            return
        self._last_status = comparable
        self.kubelet._patch_status(self.pod, status)


def _read(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as handle:
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
