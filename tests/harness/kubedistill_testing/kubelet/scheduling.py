"""Scheduling for the one local Node: requests, fit, node selectors and the scheduler's message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

Pod = dict[str, Any]


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
