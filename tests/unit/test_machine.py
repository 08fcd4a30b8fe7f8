"""The machine line printed beside measured figures (local summary, benchmarks)."""

from __future__ import annotations

from kubedistill.machine import cpu_model, describe, line


def test_cpu_model_from_cpuinfo() -> None:
    cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n"
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert cpu_model("processor\t: 0\n")  # no model name: the platform's description, never empty


def test_describe_names_cores_and_load() -> None:
    found = describe()
    assert found["cores"] >= 1 and found["loadAvg1m"] >= 0
    assert line({"cpu": "X", "cores": 2, "loadAvg1m": 1.5}) == "X, 2 cores, load average 1.5"
