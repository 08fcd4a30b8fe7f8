"""The names a Pod's /etc/hosts gives it, as cluster DNS would (the local kubelet's pure part)."""

from __future__ import annotations

from typing import Any

import pytest

from kubedistill_testing.kubelet.addresses import service_loopback_address
from kubedistill_testing.kubelet.hosts import hosts_file, own_names, service_records

NODE_HOSTS = "127.0.0.1 localhost\n127.0.0.1 vm\n"


def pod(name: str, ip: str | None, ready: bool = True, namespace: str = "a", **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"app": "ddp"}},
            "spec": spec, "status": status}  # fmt: skip


def service(name: str, cluster_ip: str, namespace: str = "a", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip, "selector": {"app": "ddp"}, **spec}}  # fmt: skip


def test_a_cluster_ip_stands_for_a_loopback_address() -> None:
    assert service_loopback_address("10.0.0.1") == "127.10.0.1"
    assert service_loopback_address("10.0.0.254") == "127.10.0.254"
    with pytest.raises(ValueError, match="not a ClusterIP"):
        service_loopback_address("10.0.1.1")


def test_services_and_the_named_pods_of_headless_services_resolve_as_in_cluster_dns() -> None:
    pods = [
        pod("w0", "198.18.0.5", hostname="worker-0", subdomain="ring"),
        pod("w1", "198.18.0.6", ready=False, hostname="worker-1", subdomain="ring"),
        pod("w2", None, hostname="worker-2", subdomain="ring"),  # no address yet
        pod("x", "198.18.0.7", hostname="x", subdomain="other"),  # another subdomain
        pod("y", "198.18.0.8", hostname="y", subdomain="ring", namespace="b"),  # another namespace
    ]
    services = [
        service("api", "10.0.0.9"),
        service("ring", "None"),
        service("ext", "", type="ExternalName", externalName="example.com"),
    ]
    by_address = {r.address: r for r in service_records(services, pods)}
    assert set(by_address) == {"127.10.0.9", "127.18.0.5"}
    api, worker = by_address["127.10.0.9"], by_address["127.18.0.5"]
    assert api.qualified == ("api.a.svc.cluster.local", "api.a.svc", "api.a") and api.short == ("api",)
    assert worker.qualified == ("worker-0.ring.a.svc.cluster.local", "worker-0.ring.a.svc", "worker-0.ring.a")
    assert worker.short == ("worker-0.ring",)
    # publishNotReadyAddresses: the unready worker is resolvable too.
    published = service_records([service("ring", "None", publishNotReadyAddresses=True)], pods)
    assert [r.address for r in published] == ["127.18.0.5", "127.18.0.6"]


def test_a_pods_hosts_file_has_the_nodes_lines_its_own_names_and_short_names_only_in_its_namespace() -> None:
    records = service_records([service("api", "10.0.0.9"), service("api", "10.0.0.10", namespace="b")], [])
    me = pod("w0", "198.18.0.5", hostname="worker-0", subdomain="ring")
    assert own_names(me) == ("worker-0.ring.a.svc.cluster.local", "worker-0")
    assert own_names(pod("plain", None)) == ("plain",)
    text = hosts_file(me, "127.18.0.5", records, NODE_HOSTS)
    assert text.splitlines()[1:] == [
        "127.0.0.1 localhost",
        "127.0.0.1 vm",
        "127.18.0.5\tworker-0.ring.a.svc.cluster.local worker-0",
        "127.10.0.9\tapi.a.svc.cluster.local api.a.svc api.a api",
        "127.10.0.10\tapi.b.svc.cluster.local api.b.svc api.b",
    ]
