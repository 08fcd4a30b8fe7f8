"""The machine a figure was measured on: CPU model, cores, load average.

A time measured on a shared two-core machine says little without the load it ran under; the local
summary and every benchmark print this beside their figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: str) -> str:
    """The `model name` of /proc/cpuinfo's text, else the platform's processor string."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> dict[str, Any]:
    """{cpu, cores, loadAvg1m}: cores are the ones this process may run on."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        cpuinfo = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"cpu": cpu_model(cpuinfo), "cores": cores, "loadAvg1m": round(os.getloadavg()[0], 2)}


def line(machine: dict[str, Any]) -> str:
    return f"{machine['cpu']}, {machine['cores']} cores, load average {machine['loadAvg1m']}"
