"""Kueue's real manager next to the test control plane.

`build()` compiles `sigs.k8s.io/kueue/cmd/kueue` at one pinned version from the Go module proxy
(`go install module@version`: the module's own go.sum pins its dependencies) and keeps the binary and
the module's CRDs under ``$KUBEDISTILL_CACHE/kueue-<version>``, built once per machine under a lock.

`start()` runs it as Kueue's own Deployment would, with the settings that differ here:

- Internal cert management on (Kueue's default): Kueue generates its CA and serving cert into the
  Secret ``kueue-system/kueue-webhook-server-cert`` and injects the CA into its CRDs' conversion
  webhooks; the harness plays the kubelet's part and copies the Secret into the cert directory. (With
  it off, Kueue insists on metrics certs at the fixed path /etc/kueue/metrics/certs.)
- No leader election, the ``batch/job`` integration only, ``manageJobsWithoutQueueName: false``: only
  Jobs labelled ``kueue.x-k8s.io/queue-name`` are Kueue's, so other tests on the shared control plane
  are untouched. Metrics off, probes and webhooks on loopback ports, the visibility server off.
- Kueue's admission webhooks are served but not registered with the API server: a registration is
  cluster-wide, so a stopped manager would block every Job of the shared control plane
  (failurePolicy Fail). Jobs are therefore created suspended by their owner — Kueue's documented path
  without the webhook, and what the kubedistill operator does for queued stage Jobs anyway. The CRDs'
  conversion webhooks point at the manager's loopback address, as Kueue's kustomize patches point them
  at its Service; nothing here reads a version other than the stored v1beta2.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubedistill_testing import cluster
from kubedistill_testing.cache import cache_root, file_lock

VERSION = "v0.17.0"
MODULE = "sigs.k8s.io/kueue"
NAMESPACE = "kueue-system"
SECRET = "kueue-webhook-server-cert"
READY_TIMEOUT_S = 120.0
# The CRDs Kueue's cert manager injects its CA into (config/components/crd/kustomization.yaml).
CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")


def cache_dir(version: str = VERSION) -> Path:
    return cache_root() / f"kueue-{version}"


def build(version: str = VERSION) -> Path:
    """The directory holding `kueue` and `crds/`, building them once per machine."""
    target = cache_dir(version)
    if (target / "kueue").is_file() and (target / "crds").is_dir():
        return target
    go = cluster.find_go()
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f"kueue-{version}.lock"):
        if (target / "kueue").is_file() and (target / "crds").is_dir():
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        log = target.with_name(target.name + ".build.log")
        print(
            f"kubedistill: building Kueue {version} (once per machine, ~5 min on 2 idle cores)",
            file=sys.stderr,
        )
        env = {
            **os.environ,
            "GOTOOLCHAIN": "local",
            "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -trimpath").strip(),
            "GOBIN": str(partial),
        }
        started = time.monotonic()
        cmd = [go, "install", "-ldflags=-s -w", f"{MODULE}/cmd/kueue@{version}"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=partial)
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise cluster.ClusterError(cluster.go_failure_line(result.stderr, log))
        module = subprocess.run(
            [go, "mod", "download", "-json", f"{MODULE}@{version}"], env=env, capture_output=True, text=True
        )
        if module.returncode != 0:
            raise cluster.ClusterError(cluster.go_failure_line(module.stderr, log))
        source = Path(json.loads(module.stdout)["Dir"]) / "config" / "components" / "crd" / "bases"
        shutil.copytree(source, partial / "crds")
        print(f"kubedistill:   Kueue built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    return target


def crds(directory: Path, webhook_port: int) -> list[dict[str, Any]]:
    """Kueue's CRDs as its kustomization installs them, conversion webhooks on the manager's loopback port."""
    docs = [yaml.safe_load(p.read_text()) for p in sorted((directory / "crds").glob("*.yaml"))]
    for doc in docs:
        if doc["spec"]["names"]["plural"] in CONVERTED:
            doc["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"url": f"https://127.0.0.1:{webhook_port}/convert"},
                },
            }
    return docs


def configuration(health_port: int, webhook_port: int, cert_dir: Path) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": True, "webhookSecretName": SECRET},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


@dataclass
class Kueue:
    process: subprocess.Popen[bytes]
    log: Path
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self._stop.set()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=cluster.STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _install(api: client.ApiClient, docs: list[dict[str, Any]]) -> None:
    ext = client.ApiextensionsV1Api(api)
    for doc in docs:
        name = doc["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(doc)
        except ApiException as err:
            if err.status != 409:
                raise
            # Keep the CA Kueue injected last time; the URL (a new port) is ours to set.
            existing = ext.read_custom_resource_definition(name)
            doc["metadata"]["resourceVersion"] = existing.metadata.resource_version
            ext.replace_custom_resource_definition(name, doc)


def _ensure_secret(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    for create in (
        lambda: core.create_namespace({"metadata": {"name": NAMESPACE}}),
        # Kueue's chart ships this Secret empty; its cert manager fills it.
        lambda: core.create_namespaced_secret(NAMESPACE, {"metadata": {"name": SECRET}}),
    ):
        try:
            create()
        except ApiException as err:
            if err.status != 409:
                raise


def _mount_secret(api: client.ApiClient, cert_dir: Path, stop: threading.Event) -> None:
    """The kubelet's part: the Secret's keys as files in the cert directory, kept current."""
    core = client.CoreV1Api(api)
    written: dict[str, str] = {}
    while not stop.wait(0.5):
        try:
            data = core.read_namespaced_secret(SECRET, NAMESPACE).data or {}
        except ApiException:
            continue
        for key in ("tls.crt", "tls.key", "ca.crt"):
            if key in data and written.get(key) != data[key]:
                tmp = cert_dir / f".{key}.tmp"
                tmp.write_bytes(base64.b64decode(data[key]))
                tmp.rename(cert_dir / key)
                written[key] = data[key]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(kubeconfig: Path, directory: Path, api: client.ApiClient) -> Kueue:
    """Install Kueue's CRDs and start its manager against this cluster; return once it is ready."""
    binary_dir = build()
    directory.mkdir(parents=True, exist_ok=True)
    cert_dir = directory / "certs"
    cert_dir.mkdir(exist_ok=True)
    health_port, webhook_port = cluster.free_port(), cluster.free_port()
    _install(api, crds(binary_dir, webhook_port))
    _ensure_secret(api)
    config_path = directory / "kueue-config.yaml"
    config_path.write_text(yaml.safe_dump(configuration(health_port, webhook_port, cert_dir)))
    log = directory / "kueue.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                str(binary_dir / "kueue"),
                f"--config={config_path}",
                "--feature-gates=VisibilityOnDemand=false",
            ],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    kueue = Kueue(process, log)
    threading.Thread(target=_mount_secret, args=(api, cert_dir, kueue._stop), daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _ready(health_port):
        if process.poll() is not None or time.monotonic() > deadline:
            kueue.stop()
            raise cluster.ClusterError(f"Kueue did not become ready: {kueue.tail()}")
        time.sleep(0.2)
    return kueue


@contextlib.contextmanager
def running(kubeconfig: Path, directory: Path, api: client.ApiClient) -> Iterator[Kueue]:
    kueue = start(kubeconfig, directory, api)
    try:
        yield kueue
    finally:
        kueue.stop()


def main() -> int:
    """`python -m kubedistill_testing.kueue build`: build (or find) the cached manager and CRDs."""
    if sys.argv[1:] != ["build"]:
        print("usage: python -m kubedistill_testing.kueue build", file=sys.stderr)
        return 2
    try:
        print(build())
    except cluster.ClusterError as err:
        print(f"kubedistill: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
