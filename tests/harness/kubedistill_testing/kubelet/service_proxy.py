"""A userspace Service proxy, as kube-proxy's old userspace mode: Services reachable at their ClusterIPs.

For every Service with a ClusterIP and each of its TCP ports it listens on
``service_loopback_address(clusterIP):port`` (10.0.0.c → 127.10.0.c, what Pods' /etc/hosts name) and
forwards each connection to a Ready endpoint of the Service's EndpointSlices (a Pod IP 198.18.b.c is
reached at its loopback 127.18.b.c), round-robin per port. It follows Service and EndpointSlice changes
as the EndpointSlice controller writes them from Pod readiness, so a Pod that stops being Ready (or is
terminating) gets no new connection; connections already forwarded run on. An endpoint that refuses a
connection is skipped for the next one, as the userspace proxy retried.

The choice of endpoint is pure (`ready_backends`, `RoundRobin`); the I/O is one asyncio loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch

from kubedistill_testing.kubelet.addresses import loopback_address, service_loopback_address

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CONNECT_TIMEOUT_S = 5.0
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Listener:
    """One Service port: where the proxy listens, and which EndpointSlice port name it forwards to."""

    namespace: str
    service: str
    address: str
    port: int
    port_name: str


def listeners(services: Iterable[Obj]) -> list[Listener]:
    """A listener per TCP port of every Service that has a ClusterIP."""
    found = []
    for service in services:
        meta, spec = service["metadata"], service.get("spec") or {}
        cluster_ip = spec.get("clusterIP")
        if not cluster_ip or cluster_ip == "None":
            continue
        try:
            address = service_loopback_address(cluster_ip)
        except ValueError:
            continue  # not from the test control plane's range: nothing here can listen for it
        for port in spec.get("ports") or []:
            if port.get("protocol", "TCP") == "TCP":
                found.append(
                    Listener(
                        meta["namespace"], meta["name"], address, int(port["port"]), port.get("name") or ""
                    )
                )
    return found


def ready_backends(
    slices: Iterable[Obj], namespace: str, service: str, port_name: str
) -> list[tuple[str, int]]:
    """(loopback address, port) of each Ready, not terminating endpoint of a Service port, in a stable order."""
    backends: set[tuple[str, int]] = set()
    for endpoint_slice in slices:
        meta = endpoint_slice["metadata"]
        if (
            meta.get("namespace") != namespace
            or (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != service
        ):
            continue
        ports = [p for p in endpoint_slice.get("ports") or [] if (p.get("name") or "") == port_name]
        for endpoint in endpoint_slice.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            # `ready` is unset while unknown: counted as ready, as kube-proxy does.
            if conditions.get("ready") is False or conditions.get("terminating"):
                continue
            for address in endpoint.get("addresses") or []:
                try:
                    local = loopback_address(address)
                except ValueError:
                    continue
                backends.update((local, int(p["port"])) for p in ports if p.get("port"))
    return sorted(backends)


class RoundRobin:
    """The next backend of a port, in turn; the turn survives changes to the set."""

    def __init__(self) -> None:
        self._turn: dict[Listener, int] = {}

    def order(self, listener: Listener, backends: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Every backend, starting with the one whose turn it is (the rest to try if it refuses)."""
        if not backends:
            return []
        turn = self._turn.get(listener, 0) % len(backends)
        self._turn[listener] = turn + 1
        return backends[turn:] + backends[:turn]


class ServiceProxy:
    """Watches Services and EndpointSlices and proxies each ClusterIP port. start() / stop()."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self._services: dict[str, Obj] = {}
        self._slices: dict[str, Obj] = {}
        self._servers: dict[Listener, asyncio.Server] = {}
        self._turns = RoundRobin()
        # Changes arrive as separate coroutines: one at a time, or two would bind the same new listener.
        self._sync_lock: asyncio.Lock | None = None
        self._loop = asyncio.new_event_loop()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> ServiceProxy:
        loops: list[tuple[Callable[..., None], tuple[Any, ...], str]] = [
            (self._loop.run_forever, (), "service-proxy"),
            (self._watch, (self.core.list_service_for_all_namespaces, self._services), "service-proxy-services"),
            (self._watch, (self.discovery.list_endpoint_slice_for_all_namespaces, self._slices), "service-proxy-slices"),
        ]  # fmt: skip
        for target, args, name in loops:
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop the watches first (so no change arrives after), then the listeners and the loop."""
        self._stop.set()
        if not self._threads:
            return  # never started
        loop_thread, *watches = self._threads
        for thread in watches:
            thread.join(timeout=10)
        with contextlib.suppress(RuntimeError):  # the loop was already closed
            asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        loop_thread.join(timeout=10)

    def listening(self) -> list[Listener]:
        """The Service ports the proxy listens on now (tests wait for a Service to appear here)."""
        return list(self._servers)

    # -- watches (threads) ----------------------------------------------------------------------------

    def _watch(self, lister: Callable[..., Any], into: dict[str, Obj]) -> None:
        """List and watch one kind; every change is applied on the proxy's loop."""
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    listing = json.loads(lister(_preload_content=False).data)
                    resource_version = listing["metadata"]["resourceVersion"]
                    self._apply(into, {o["metadata"]["uid"]: o for o in listing["items"]}, replace=True)
                for event in watch.Watch().stream(
                    lister, resource_version=resource_version, timeout_seconds=2, allow_watch_bookmarks=True
                ):
                    obj = event["raw_object"]
                    if event["type"] == "ERROR":
                        resource_version = None
                        break
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        uid = obj["metadata"]["uid"]
                        self._apply(into, {} if event["type"] == "DELETED" else {uid: obj}, drop=uid)
                    if self._stop.is_set():
                        break
            except Exception as err:  # any failure means: relist and carry on
                if not self._stop.is_set():
                    log.debug("service proxy: watch failed, relisting: %s", err)
                resource_version = None
                self._stop.wait(0.5)

    def _apply(
        self, into: dict[str, Obj], items: dict[str, Obj], *, replace: bool = False, drop: str = ""
    ) -> None:
        """Change `into` on the loop (its only writer), then follow the change with the listeners."""

        if self._stop.is_set():
            return

        async def apply() -> None:
            if replace:
                into.clear()
            into.pop(drop, None)
            into.update(items)
            await self._sync_listeners()

        with contextlib.suppress(RuntimeError):  # stopping
            asyncio.run_coroutine_threadsafe(apply(), self._loop)

    # -- the loop -------------------------------------------------------------------------------------

    async def _sync_listeners(self) -> None:
        self._sync_lock = self._sync_lock or asyncio.Lock()
        async with self._sync_lock:
            await self._sync_listeners_now()

    async def _sync_listeners_now(self) -> None:
        wanted = set(listeners(self._services.values()))
        for gone in set(self._servers) - wanted:
            self._servers.pop(gone).close()
        for new in wanted - set(self._servers):
            try:
                self._servers[new] = await asyncio.start_server(
                    functools.partial(self._forward, new), new.address, new.port
                )
            except OSError as err:
                log.warning("service proxy: cannot listen on %s:%d for %s/%s: %s",
                            new.address, new.port, new.namespace, new.service, err)  # fmt: skip

    async def _close_all(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    async def _forward(
        self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        backends = ready_backends(
            self._slices.values(), listener.namespace, listener.service, listener.port_name
        )
        upstream = None
        for host, port in self._turns.order(listener, backends):
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
                break
            except (OSError, TimeoutError):
                continue
        if upstream is None:
            writer.close()  # no Ready endpoint: the connection is refused, as by kube-proxy's REJECT rule
            return
        up_reader, up_writer = upstream
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                end.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until EOF, then half-close: the other direction may still be answering."""
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()  # a peer is gone: closing ends the other direction's read too
