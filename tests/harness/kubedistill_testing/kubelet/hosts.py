"""Pod name resolution as a cluster's DNS gives it, written as each Pod's /etc/hosts (pure functions).

A node's Pods resolve Service and Pod names through cluster DNS; here each container runs in a private
mount namespace with a per-pod hosts file over /etc/hosts (:mod:`.mounts`), which the kubelet rewrites
as Pods and Services change. It holds:

- the node's own hosts lines (localhost, and the node's name, which the Pod's processes see as the host);
- the Pod's own hostname, as a kubelet writes it (``hostname.subdomain.ns.svc.cluster.local hostname``
  with ``spec.subdomain``);
- per headless Service, each of its Pods with ``hostname`` and ``subdomain`` equal to the Service's name:
  ``<hostname>.<svc>.<ns>.svc.cluster.local``, ``….svc``, ``<hostname>.<svc>.<ns>`` and, from the same
  namespace, ``<hostname>.<svc>`` → the Pod's loopback address (only Ready Pods unless the Service
  publishes not-ready addresses);
- per Service with a ClusterIP: ``<svc>.<ns>.svc.cluster.local``, ``<svc>.<ns>.svc``, ``<svc>.<ns>`` and,
  from the same namespace, ``<svc>`` → the loopback address its ClusterIP stands for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubedistill_testing.kubelet.addresses import loopback_address, service_loopback_address

Obj = Mapping[str, Any]
CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Record:
    """One address and its names: `qualified` resolve from any namespace, `short` only from `namespace`."""

    address: str
    namespace: str
    qualified: tuple[str, ...]
    short: tuple[str, ...]


def _qualified(name: str, namespace: str) -> tuple[str, ...]:
    return (f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{name}.{namespace}.svc", f"{name}.{namespace}")


def _ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _selects(selector: Mapping[str, str], pod: Obj) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def service_records(services: Iterable[Obj], pods: Iterable[Obj]) -> list[Record]:
    """What cluster DNS answers for these Services: ClusterIPs, and headless Services' named Pods."""
    pods = list(pods)
    records = []
    for service in services:
        meta, spec = service["metadata"], service.get("spec") or {}
        name, namespace = meta["name"], meta["namespace"]
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and cluster_ip != "None":
            records.append(
                Record(service_loopback_address(cluster_ip), namespace, _qualified(name, namespace), (name,))
            )
            continue
        if cluster_ip != "None":  # ExternalName, or not given an address yet
            continue
        for pod in pods:
            pod_meta, pod_spec = pod["metadata"], pod.get("spec") or {}
            pod_ip = (pod.get("status") or {}).get("podIP")
            hostname = pod_spec.get("hostname")
            if not (
                pod_ip
                and hostname
                and pod_meta.get("namespace") == namespace
                and pod_spec.get("subdomain") == name
                and not pod_meta.get("deletionTimestamp")
                and _selects(spec.get("selector") or {}, pod)
                and (spec.get("publishNotReadyAddresses") or _ready(pod))
            ):
                continue
            records.append(
                Record(
                    loopback_address(pod_ip),
                    namespace,
                    _qualified(f"{hostname}.{name}", namespace),
                    (f"{hostname}.{name}",),
                )
            )
    return records


def own_names(pod: Obj) -> tuple[str, ...]:
    """The Pod's own names as a kubelet writes them: its FQDN (with a subdomain) and its hostname."""
    meta, spec = pod["metadata"], pod.get("spec") or {}
    hostname = spec.get("hostname") or meta["name"]
    subdomain = spec.get("subdomain")
    if subdomain:
        return (f"{hostname}.{subdomain}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}", hostname)
    return (hostname,)


def hosts_file(pod: Obj, address: str, records: Iterable[Record], node_hosts: str) -> str:
    """The Pod's /etc/hosts: the node's lines, the Pod's own names at `address`, then the cluster's names."""
    namespace = pod["metadata"]["namespace"]
    lines = ["# Kubernetes-managed hosts file (the local kubelet's).", node_hosts.rstrip("\n")]
    lines.append(f"{address}\t{' '.join(own_names(pod))}")
    for record in records:
        names = record.qualified + (record.short if record.namespace == namespace else ())
        lines.append(f"{record.address}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"
