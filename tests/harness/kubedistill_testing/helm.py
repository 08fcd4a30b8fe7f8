"""Helm for the chart tests: built once per machine from its Go module at a pinned version.

    python -m kubedistill_testing.helm build     # build or find helm; prints its path

``KUBEDISTILL_HELM`` names an existing helm binary instead (it must be the pinned major version).
The build goes to ``$KUBEDISTILL_CACHE/helm-<version>/helm`` (default ``~/.cache/kubedistill``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubedistill_testing.cache import cache_root, file_lock
from kubedistill_testing.paths import repo_root

HELM_MODULE = "helm.sh/helm/v3"
HELM_VERSION = "v3.21.4"


# The value sets the chart is tested with (tests/unit/test_chart.py renders them, tests/e2e/test_helm.py
# sends them to the API server): the defaults; namespaced with MinIO; GPU placement, peering and alerts;
# two teams with their own storage scopes.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-minio": {
        "watchNamespaces": ["ml", "research"],
        "minio": {"enabled": True, "persistence": {"enabled": True, "size": "5Gi"}},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}],
        },
    },
    "gpu": {
        "stages": {"train": {"gpus": 2, "resources": {"requests": {"cpu": "8", "memory": "64Gi"}}}},
        "gpu": {
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "cloud.google.com/gke-spot",
                    "operator": "Equal",
                    "value": "true",
                    "effect": "NoSchedule",
                },
            ],
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        },
        "trainer": {"image": {"tag": "0.1.0-cu128"}, "env": {"HF_HUB_OFFLINE": "1"}},
        "storage": {
            "bucket": "ml-artifacts",
            "endpoint": "https://s3.eu-west-1.amazonaws.com",
            "existingSecret": "s3",
        },
        "replicaCount": 2,
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    },
    "multi-team": {
        "storage": {
            "bucket": "shared",
            "existingSecret": "s3-shared",
            "sharedReadURIs": ["s3://models-cache/"],
            "scopes": [
                {"namespace": "team-a", "bucket": "teams", "prefix": "a", "secret": "s3-team-a"},
                {
                    "namespaceSelector": {"matchLabels": {"kubedistill.io/team": "b"}},
                    "bucket": "teams",
                    "prefix": "b",
                    "secret": "s3-team-b",
                    "serviceAccount": "team-b-s3",
                },
            ],
        },
        "policy": {"allowedImagePrefixes": ["ghcr.io/kubedistill/", "registry.example.com/ml/"]},
    },
}


class HelmError(RuntimeError):
    """helm could not be built or run; the message says what is missing."""


def helm_path(version: str = HELM_VERSION) -> Path:
    return cache_root() / f"helm-{version}" / "helm"


def _go() -> str:
    for candidate in (os.environ.get("GO"), shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise HelmError("the Go toolchain was not found (helm is built from its Go module); set GO=/path/to/go")


def kube_version(go_mod: str) -> tuple[int, int]:
    """The Kubernetes version helm's client-go stands for (v0.36.x -> 1.36), as helm's Makefile derives it."""
    match = re.search(r"^\s*k8s\.io/client-go\s+v(\d+)\.(\d+)\.", go_mod, re.MULTILINE)
    if not match:
        raise HelmError("helm's go.mod does not require k8s.io/client-go")
    return int(match.group(1)) + 1, int(match.group(2))


def ldflags(version: str, env: Mapping[str, str]) -> str:
    """Helm's release ldflags: its version, and the Kubernetes version `helm template` and lint assume
    (without them helm claims Kubernetes v1.20 and refuses charts needing newer)."""
    result = subprocess.run(
        [_go(), "mod", "download", "-json", f"{HELM_MODULE}@{version}"],
        env=dict(env),
        capture_output=True,
        text=True,
    )
    try:
        go_mod = Path(json.loads(result.stdout)["GoMod"]).read_text()
    except (ValueError, KeyError, OSError) as err:
        raise HelmError(
            f"go mod download {HELM_MODULE}@{version} failed: {result.stderr.strip() or err}"
        ) from None
    major, minor = kube_version(go_mod)
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={version}"]
    for package in ("pkg/lint/rules", "pkg/chartutil"):
        flags += [
            f"-X helm.sh/helm/v3/{package}.k8sVersionMajor={major}",
            f"-X helm.sh/helm/v3/{package}.k8sVersionMinor={minor}",
        ]
    return " ".join(flags)


def build(version: str = HELM_VERSION) -> Path:
    """The pinned helm binary, built with `go install` on first use (a few minutes on 2 cores)."""
    override = os.environ.get("KUBEDISTILL_HELM")
    if override:
        return Path(override)
    target = helm_path(version)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent.parent / f"helm-{version}.lock"):
        if target.is_file():
            return target  # another process built it while we waited
        partial = target.parent / "partial"
        partial.mkdir(exist_ok=True)
        print(f"kubedistill: building helm {version} (once per machine)", file=sys.stderr)
        env = {**os.environ, "GOBIN": str(partial), "GOTOOLCHAIN": "local"}
        started = time.monotonic()
        result = subprocess.run(
            [_go(), "install", f"-ldflags={ldflags(version, env)}", f"{HELM_MODULE}/cmd/helm@{version}"],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            last = next((ln for ln in reversed(result.stderr.splitlines()) if ln.strip()), "no output")
            raise HelmError(f"go install {HELM_MODULE}/cmd/helm@{version} failed: {last.strip()}")
        (partial / "helm").rename(target)
        partial.rmdir()
        print(f"kubedistill:   helm built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return target


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run helm with a private HELM_* home, so a developer's repositories and plugins do not leak in."""
    home = cache_root() / "helm-home"
    full_env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        **(env or {}),
    }
    result = subprocess.run(
        [str(build()), *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )
    if check and result.returncode != 0:
        raise HelmError(f"helm {' '.join(args[:1])} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def chart_dir() -> Path:
    return repo_root() / "charts" / "kubedistill"


def template(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = "kd",
    namespace: str = "kubedistill-system",
    kube_version: str | None = None,
    chart: Path | None = None,
    include_crds: bool = False,
) -> list[dict[str, Any]]:
    """`helm template` of the chart with these values, as a list of objects (empty documents dropped).

    `include_crds` adds the chart's crds/ directory (kopf's peering CRDs), as `helm install` would.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(dict(values or {}), handle)
    try:
        args = [
            "template",
            release,
            str(chart or chart_dir()),
            "--namespace",
            namespace,
            "--values",
            handle.name,
        ]
        if kube_version:
            args += ["--kube-version", kube_version]
        if include_crds:
            args.append("--include-crds")
        rendered = run(args).stdout
    finally:
        os.unlink(handle.name)
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubedistill_testing.helm")
    parser.add_argument("command", choices=["build"])
    parser.parse_args(argv)
    try:
        print(build())
    except HelmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
