"""Pod addresses: each Pod gets one of its own, so two replicas can both listen on port 8080.

A process can only bind loopback addresses here, but the API server refuses loopback addresses in
EndpointSlices (`ValidateNonSpecialIP`). So each Pod has a pair that differs only in the first octet:

- ``198.18.b.c`` (RFC 2544's benchmarking range, routed nowhere) is its ``status.podIP``, the address
  the API, the EndpointSlice controller and anything that reads them see;
- ``127.18.b.c`` is the loopback address its processes bind. Inside the Pod, ``fieldRef: status.podIP``
  reads as this address (a Pod's own IP is bindable in its network namespace on a real node), and the
  kubelet's probes and hooks connect to it. `loopback_address` maps one to the other for clients.
"""

from __future__ import annotations

import ipaddress

from kubedistill_testing.cluster import SERVICE_CIDR

POD_NETWORK = ipaddress.IPv4Network("198.18.0.0/16")
LOOPBACK_NETWORK = ipaddress.IPv4Network("127.18.0.0/16")
_OFFSET = int(LOOPBACK_NETWORK.network_address) - int(POD_NETWORK.network_address)


def loopback_address(pod_ip: str) -> str:
    """The loopback address that a Pod IP handed out by the local kubelet stands for."""
    address = ipaddress.IPv4Address(pod_ip)
    if address not in POD_NETWORK:
        raise ValueError(f"{pod_ip} is not a local kubelet Pod IP (those are in {POD_NETWORK})")
    return str(ipaddress.IPv4Address(int(address) + _OFFSET))


class PodAddresses:
    """Hands out Pod IPs in order, skipping those in use, so a freed address is not reused at once."""

    def __init__(self) -> None:
        self._hosts = [str(ip) for ip in POD_NETWORK.hosts() if ip.packed[-1] not in (0, 255)]
        self._next = 0
        self._used: set[str] = set()

    def allocate(self) -> str:
        for _ in range(len(self._hosts)):
            candidate = self._hosts[self._next]
            self._next = (self._next + 1) % len(self._hosts)
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate
        raise RuntimeError(f"the local kubelet ran out of Pod addresses in {POD_NETWORK}")

    def release(self, pod_ip: str) -> None:
        self._used.discard(pod_ip)


# The test control plane's Service CIDR and the loopback range its ClusterIPs stand for, the same way: the
# Service proxy listens on 127.10.0.c for the Service whose ClusterIP is 10.0.0.c.
SERVICE_NETWORK = ipaddress.IPv4Network(SERVICE_CIDR)
SERVICE_LOOPBACK_NETWORK = ipaddress.IPv4Network("127.10.0.0/24")
_SERVICE_OFFSET = int(SERVICE_LOOPBACK_NETWORK.network_address) - int(SERVICE_NETWORK.network_address)


def service_loopback_address(cluster_ip: str) -> str:
    """The loopback address that a Service's ClusterIP stands for (where its proxy listens)."""
    address = ipaddress.IPv4Address(cluster_ip)
    if address not in SERVICE_NETWORK:
        raise ValueError(f"{cluster_ip} is not a ClusterIP of the test control plane ({SERVICE_NETWORK})")
    return str(ipaddress.IPv4Address(int(address) + _SERVICE_OFFSET))
