"""The local kubelet's node: registers the Node, binds Pods that fit, starts a worker per Pod, serves
the kubelet API's container logs and hands out Pod addresses."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import sys
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity

from kubedistill_testing.kubelet.addresses import PodAddresses
from kubedistill_testing.kubelet.api_calls import STRATEGIC_MERGE, PodApiCalls
from kubedistill_testing.kubelet.containers import TERMINAL, inherited_env, now
from kubedistill_testing.kubelet.hosts import Record, hosts_file, service_records
from kubedistill_testing.kubelet.logs import LogError, LogServer, previous_path, self_signed_certificate
from kubedistill_testing.kubelet.mounts import namespace_support, write_in_place
from kubedistill_testing.kubelet.scheduling import (
    insufficient,
    pod_requests,
    scheduled_condition,
    selector_matches,
    unschedulable_message,
)
from kubedistill_testing.kubelet.service_proxy import ServiceProxy
from kubedistill_testing.kubelet.worker import PodWorker
from kubedistill_testing.servers import server_images

log = logging.getLogger(__name__)

Pod = dict[str, Any]

DEFAULT_IMAGES: dict[str, list[str]] = {
    "ghcr.io/kubedistill/trainer": [sys.executable, "-m", "kubedistill_trainer"],
}
DEFAULT_COMMANDS: dict[str, str] = {"python": sys.executable, "python3": sys.executable}
DEFAULT_CAPACITY: dict[str, str] = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "0"}
NODE_ADDRESS = "127.0.0.1"
SERVICE = "service-"  # the prefix of the Service watch's events


class LocalKubelet(PodApiCalls):
    """Runs the Pods of one Node as local processes. Use as a context manager, or start() / stop().

    ``backoff_base_s`` and ``backoff_max_s`` are the restart back-off (a node's are 10 s and 300 s);
    ``max_grace_seconds`` caps every grace period, so a test never waits the default 30 s."""

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
        backoff_base_s: float = 10.0,
        backoff_max_s: float = 300.0,
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
        # The upstream model server and gateway images run the real servers where they are built.
        self.images = {**DEFAULT_IMAGES, **server_images()} if images is None else dict(images)
        self.commands = dict(DEFAULT_COMMANDS if commands is None else commands)
        self.base_env = {**inherited_env(os.environ), **(extra_env or {})}
        self.max_grace_seconds = max_grace_seconds
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.addresses = PodAddresses()
        self.service_proxy = ServiceProxy(api)
        self._server: LogServer | None = None
        server = urllib.parse.urlsplit(api.configuration.host)
        self.api_host, self.api_port = server.hostname or "127.0.0.1", server.port or 443
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Owned by the loop thread only: no locks.
        self._pods: dict[str, Pod] = {}
        self._services: dict[str, dict[str, Any]] = {}
        self._hosts_stale = False
        self._node_hosts = _node_hosts()
        # Why containers run without a private mount namespace (None: they run in one, through `unshare`).
        self.namespace_problem: str | None = "the kubelet is not started"
        self.unshare: str | None = None
        self._workers: dict[str, PodWorker] = {}
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
        return [pid for worker in list(self._workers.values()) for pid in worker.pids()]

    @property
    def port(self) -> int:
        """The kubelet API's port (the Node's daemonEndpoints.kubeletEndpoint.Port)."""
        if self._server is None:
            raise RuntimeError("the local kubelet is not started")
        return self._server.port

    def start(self) -> LocalKubelet:
        ca_file = self.api.configuration.ssl_ca_cert
        if not ca_file:
            raise RuntimeError("the local kubelet needs the cluster CA to authenticate the API server")
        certificate = self_signed_certificate(self.root / "pki", NODE_ADDRESS)
        self._server = LogServer(
            NODE_ADDRESS, self, self._authorize, client_ca=ca_file, certificate=certificate
        ).start()
        self._register_node()
        self.service_proxy.start()
        self.namespace_problem = namespace_support()
        self.unshare = None if self.namespace_problem else shutil.which("unshare")
        if self.namespace_problem:
            log.warning(
                "local kubelet: containers run without a private mount namespace (%s): Pods resolve "
                "names as this machine does",
                self.namespace_problem,
            )
        loops: list[tuple[Callable[..., None], tuple[Any, ...], str]] = [
            (self._watch_loop, (self.core.list_pod_for_all_namespaces, ""), "kubelet-watch"),
            (self._watch_loop, (self.core.list_service_for_all_namespaces, SERVICE), "kubelet-services"),
            (self._sync_loop, (), "kubelet-sync"),
        ]
        for target, args, name in loops:
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Kill every container process and stop the threads; Pods are left as they are in the API."""
        self._stop.set()
        if self._server is not None:
            self._server.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self.service_proxy.stop()
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
            "addresses": [{"type": "InternalIP", "address": NODE_ADDRESS}, {"type": "Hostname", "address": self.node_name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
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

    def _watch_loop(self, lister: Callable[..., Any], prefix: str) -> None:
        """List and watch one kind in all namespaces, queueing `prefix`-tagged events for the loop thread."""
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listing = json.loads(lister(_preload_content=False).data)
                    resource_version = listing["metadata"]["resourceVersion"]
                    self._events.put((prefix + "relist", listing["items"]))
                # A short server-side timeout bounds how long stop() waits for this thread.
                for event in watch.Watch().stream(
                    lister,
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
                        self._events.put((prefix + event["type"], obj))
                    if self._stop.is_set():
                        break
            except Exception as err:  # any failure means: relist and carry on
                if not self._stop.is_set():
                    log.debug("%swatch failed, relisting: %s", prefix, err)
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
        if kind.startswith(SERVICE):
            self._services_changed(kind.removeprefix(SERVICE), payload)
            return self._refresh_hosts()
        if kind != "resync":
            self._hosts_stale = True
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
            done = self._workers.pop(payload, None)
            if done is not None:
                self.addresses.release(done.pod_ip)
            if payload in self._pods:
                self._finished.add(payload)
            else:  # deleted while its containers stopped
                self._remove_pod_dir(payload)
        for pod in sorted(self._pods.values(), key=lambda p: p["metadata"].get("creationTimestamp", "")):
            self._reconcile(pod)
        self._refresh_hosts()

    # -- names ----------------------------------------------------------------------------------------

    def _services_changed(self, kind: str, payload: Any) -> None:
        if kind == "relist":
            self._services = {s["metadata"]["uid"]: s for s in payload}
        elif kind == "DELETED":
            self._services.pop(payload["metadata"]["uid"], None)
        else:
            self._services[payload["metadata"]["uid"]] = payload
        self._hosts_stale = True

    def _refresh_hosts(self) -> None:
        """Rewrite every running Pod's /etc/hosts whose content a Pod or Service change has changed."""
        if not self._hosts_stale:
            return
        self._hosts_stale = False
        records = service_records(self._services.values(), self._pods.values())
        for worker in self._workers.values():
            self._write_hosts(worker, records)

    def _write_hosts(self, worker: PodWorker, records: list[Record]) -> None:
        content = hosts_file(worker.pod, worker.local_ip, records, self._node_hosts)
        if content != worker.hosts_content:
            worker.hosts_file.parent.mkdir(parents=True, exist_ok=True)
            write_in_place(worker.hosts_file, content)
            worker.hosts_content = content

    def _forget(self, uid: str) -> None:
        self._pods.pop(uid, None)
        worker = self._workers.get(uid)
        if worker:
            worker.kill(grace=0, report=False)
        else:
            self._remove_pod_dir(uid)
        self._finished.discard(uid)
        self._delete_sent.discard(uid)

    def _remove_pod_dir(self, uid: str) -> None:
        """A deleted Pod's volumes go with it (its logs stay, for the tests that read them afterwards)."""
        shutil.rmtree(self.root / "pods" / uid, ignore_errors=True)

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
            worker = PodWorker(self, pod, self.addresses.allocate())
            self._workers[uid] = worker
            self._write_hosts(worker, service_records(self._services.values(), self._pods.values()))
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

    # -- the kubelet API (its log server's LogSource) -------------------------------------------------

    def log_file(self, namespace: str, pod: str, container: str, previous: bool) -> Path:
        """The log of a container's current run, or of its previous one; LogError says why there is none."""
        found = next(
            (p for p in list(self._pods.values())
             if (p["metadata"]["namespace"], p["metadata"]["name"]) == (namespace, pod)),
            None,
        )  # fmt: skip
        if found is None:
            raise LogError(404, f'pods "{pod}" not found')
        spec = found["spec"]
        names = [c["name"] for c in [*(spec.get("initContainers") or []), *spec["containers"]]]
        if container not in names:
            raise LogError(400, f"container {container} is not valid for pod {pod}")
        path = self.log_path(namespace, pod, container)
        if previous:
            path = previous_path(path)
            if not path.exists():
                raise LogError(400, f'previous terminated container "{container}" in pod "{pod}" not found')
        elif not path.exists():
            raise LogError(400, f'container "{container}" in pod "{pod}" is waiting to start')
        return path

    def still_running(self, namespace: str, pod: str, container: str) -> bool:
        for worker in list(self._workers.values()):
            meta = worker.pod["metadata"]
            if (meta["namespace"], meta["name"]) == (namespace, pod):
                return worker.is_running(container)
        return False


def _node_hosts() -> str:
    try:
        return Path("/etc/hosts").read_text(encoding="utf-8")
    except OSError:
        return "127.0.0.1\tlocalhost\n"
