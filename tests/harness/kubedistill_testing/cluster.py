"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

The binaries are built once per machine from the Go tools module in ``tests/controlplane/`` (which pins
``k8s.io/kubernetes``) and cached under ``$KUBEDISTILL_CACHE`` (default ``~/.cache/kubedistill``) in a
directory named after the pinned version, so a new pin means a new build and nothing else does.

Command line::

    python -m kubedistill_testing.cluster build            # build or find the binaries
    python -m kubedistill_testing.cluster up --dir DIR     # start; prints the kubeconfig path
    python -m kubedistill_testing.cluster down --dir DIR   # stop exactly what `up` started

Every process `up` starts is recorded in ``DIR/processes.json`` with its /proc start time, so `down`
never signals a recycled pid.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubedistill.local.processes import free_port as any_free_port
from kubedistill_testing.cache import cache_root, file_lock
from kubedistill_testing.paths import repo_root

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
GO_PACKAGES = (
    "./cmd/etcd",
    "k8s.io/kubernetes/cmd/kube-apiserver",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
)
CONTROLLERS = (
    "job",
    "garbagecollector",
    "ttl-after-finished",
    "namespace",
    "serviceaccount",
    "serviceaccount-token",
    "deployment",
    "replicaset",
    # Service endpoints follow Pod readiness, which the local kubelet's probes decide.
    "endpointslice",
)
SERVICE_CIDR = "10.0.0.0/24"
# The first address of SERVICE_CIDR: the apiserver's own `kubernetes` Service, which must be in its cert.
SERVICE_IP = "10.0.0.1"
ADMIN_USER = "kubedistill-admin"
# How the API server authenticates to kubelets (for logs); kubeadm's name, cluster-admin's rights here.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
PORT_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """Anything that stops the control plane from being built or started; the message is one line."""


# ---------------------------------------------------------------------------------------------------
# Locations and versions
# ---------------------------------------------------------------------------------------------------


def tools_module_dir() -> Path:
    override = os.environ.get("KUBEDISTILL_CONTROLPLANE_MODULE")
    if override:
        return Path(override)
    return repo_root() / "tests" / "controlplane"


def pinned_version(go_mod: str) -> str:
    """The k8s.io/kubernetes version a tools go.mod requires."""
    match = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", go_mod, re.MULTILINE)
    if not match:
        raise ClusterError("tests/controlplane/go.mod does not require k8s.io/kubernetes")
    return match.group(1)


def required_go(go_mod: str) -> tuple[int, int]:
    match = re.search(r"^go\s+(\d+)\.(\d+)", go_mod, re.MULTILINE)
    return (int(match.group(1)), int(match.group(2))) if match else (1, 0)


def parse_go_version(output: str) -> tuple[int, int] | None:
    """(major, minor) from `go version` output, e.g. 'go version go1.26.8 linux/amd64'."""
    match = re.search(r"go(\d+)\.(\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def binaries_dir(version: str) -> Path:
    return cache_root() / f"controlplane-{version}"


_FETCH_FAILURE = re.compile(
    r"\b40[34]\b|\b410\b|refused|dial tcp|no such host|timeout|GOPROXY=off|verifying module"
)


def go_failure_line(stderr: str, log: Path) -> str:
    """One line that says what a failed `go build` lacked: a module it could not fetch, or where the log is."""
    lines = stderr.splitlines()
    failure = next((ln for ln in lines if _FETCH_FAILURE.search(ln)), None)
    if failure:
        named = re.search(r"([\w.\-]+(?:/[\w.\-~]+)+)@(v[\w.\-+]+): (.*)", failure)
        downloads = [m for ln in lines if (m := re.match(r"go: downloading (\S+) (v\S+)", ln))]
        if named:
            module, version, why = named.groups()
        elif downloads:
            (module, version), why = downloads[-1].groups(), failure.split(": ")[-1]
        else:
            module, version, why = "a required module", "", failure.strip()
        return (
            f"the Go module proxy did not serve {module} {version} ({why.strip()}); check GOPROXY and network "
            "access, or set KUBEDISTILL_TEST_KUBECONFIG to an existing cluster"
        )
    last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
    return f"go build of the control plane failed: {last.strip()} (full log: {log})"


# ---------------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------------


# Where the official tarball installs Go; often not on PATH in CI images.
GO_FALLBACKS: tuple[str, ...] = ("/usr/local/go/bin/go",)


def find_go() -> str:
    candidates = [os.environ.get("GO"), shutil.which("go"), *GO_FALLBACKS]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ClusterError(
        "the Go toolchain was not found: the test control plane is built from source once per machine; "
        "install Go from https://go.dev/dl/ (or set GO=/path/to/go), or set KUBEDISTILL_TEST_KUBECONFIG "
        "to an existing cluster"
    )


def build(module_dir: Path | None = None) -> Path:
    """Return the directory holding etcd, kube-apiserver and kube-controller-manager, building if needed."""
    module_dir = module_dir or tools_module_dir()
    go_mod = (module_dir / "go.mod").read_text()
    version = pinned_version(go_mod)
    target = binaries_dir(version)
    if all((target / name).is_file() for name in BINARIES):
        return target

    go = find_go()
    have = parse_go_version(subprocess.run([go, "version"], capture_output=True, text=True).stdout)
    need = required_go(go_mod)
    if have is None or have < need:
        raise ClusterError(
            f"Go {need[0]}.{need[1]} or newer is needed to build the test control plane, found "
            f"{'an unknown version' if have is None else f'{have[0]}.{have[1]}'}; install it from "
            "https://go.dev/dl/ or set GO=/path/to/go"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f"controlplane-{version}.lock"):
        if all((target / name).is_file() for name in BINARIES):
            return target  # another process built it while we waited for the lock
        partial = target.with_name(target.name + ".partial")
        partial.mkdir(exist_ok=True)
        log = target.with_name(target.name + ".build.log")
        print(
            f"kubedistill: building the test control plane {version} (once per machine, ~11 min on 2 idle cores)",
            file=sys.stderr,
        )
        env = {
            **os.environ,
            # Never let `go` fetch a newer toolchain behind our back: that is a slow, silent download.
            "GOTOOLCHAIN": "local",
            "GOFLAGS": (os.environ.get("GOFLAGS", "") + " -trimpath").strip(),
        }
        ldflags = f"-s -w -X k8s.io/component-base/version.gitVersion={version}"
        cmd = [go, "build", f"-ldflags={ldflags}", "-o", f"{partial}/", *GO_PACKAGES]
        started = time.monotonic()
        result = subprocess.run(cmd, cwd=module_dir, env=env, capture_output=True, text=True)
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ClusterError(go_failure_line(result.stderr, log))
        print(f"kubedistill:   control plane built in {time.monotonic() - started:.0f} s", file=sys.stderr)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    return target


# ---------------------------------------------------------------------------------------------------
# PKI (openssl CLI: present on every Linux, and keeps this free of a crypto dependency)
# ---------------------------------------------------------------------------------------------------

_CA_CONFIG = """[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
"""


def server_extensions() -> str:
    names = ["DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc"]
    names += ["DNS:kubernetes.default.svc.cluster.local", "IP:127.0.0.1", f"IP:{SERVICE_IP}"]
    return (
        f"subjectAltName = {','.join(names)}\n"
        "extendedKeyUsage = serverAuth\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
    )


CLIENT_EXTENSIONS = "extendedKeyUsage = clientAuth\nkeyUsage = critical,digitalSignature,keyEncipherment\n"


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {result.stderr.strip().splitlines()[-1:]}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def _signed_cert(pki: Path, name: str, subject: str, extensions: str) -> None:
    key, csr, ext = pki / f"{name}.key", pki / f"{name}.csr", pki / f"{name}.ext"
    _ec_key(key)
    _openssl(
        "req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr), "-config", str(pki / "ca.cnf")
    )
    ext.write_text(extensions)
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"),
        "-set_serial", str(secrets.randbits(63)), "-days", "365", "-extfile", str(ext),
        "-out", str(pki / f"{name}.crt"),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()


def make_pki(pki: Path) -> None:
    """CA, apiserver serving cert, admin and kubelet-client client certs and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "ca.cnf").write_text(_CA_CONFIG)
    _ec_key(pki / "ca.key")
    _openssl(
        "req", "-x509", "-new", "-key", str(pki / "ca.key"), "-subj", "/CN=kubedistill-test-ca",
        "-days", "365", "-config", str(pki / "ca.cnf"), "-extensions", "v3_ca", "-out", str(pki / "ca.crt"),
    )  # fmt: skip
    _signed_cert(pki, "apiserver", "/CN=kube-apiserver", server_extensions())
    _signed_cert(pki, "admin", f"/O=system:masters/CN={ADMIN_USER}", CLIENT_EXTENSIONS)
    _signed_cert(
        pki, "apiserver-kubelet-client", f"/O=system:masters/CN={KUBELET_CLIENT_USER}", CLIENT_EXTENSIONS
    )
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


def kubeconfig(server: str, pki: Path) -> dict[str, object]:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kubedistill-test", "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": ADMIN_USER, "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")}}],
        "contexts": [{"name": "kubedistill-test", "context": {"cluster": "kubedistill-test", "user": ADMIN_USER}}],
        "current-context": "kubedistill-test",
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Component command lines (pure)
# ---------------------------------------------------------------------------------------------------


def etcd_args(bin_dir: Path, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    return [
        str(bin_dir / "etcd"),
        f"--data-dir={data_dir}",
        f"--listen-client-url=http://127.0.0.1:{client_port}",
        f"--listen-peer-url=http://127.0.0.1:{peer_port}",
    ]


def apiserver_args(bin_dir: Path, pki: Path, etcd_port: int, port: int) -> list[str]:
    return [
        str(bin_dir / "kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        # The endpoint reconciler refuses loopback addresses; nothing here needs the kubernetes Endpoints.
        "--endpoint-reconciler-type=none",
        f"--secure-port={port}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--authorization-mode=RBAC",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        # Logs and exec go to the node's InternalIP: its Hostname address resolves nowhere.
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        "--kubelet-preferred-address-types=InternalIP",
        # One client, a handful of requests: fairness queuing only adds latency here.
        "--enable-priority-and-fairness=false",
        "--profiling=false",
    ]


def controller_manager_args(bin_dir: Path, pki: Path, kubeconfig_path: Path) -> list[str]:
    return [
        str(bin_dir / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig_path}",
        f"--controllers={','.join(CONTROLLERS)}",
        "--leader-elect=false",
        # No health endpoint needed: `down` tracks the process, and nothing else listens means no port clash.
        "--secure-port=0",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        "--use-service-account-credentials=false",
        "--concurrent-job-syncs=10",
        "--concurrent-gc-syncs=10",
        "--concurrent-ttl-after-finished-syncs=10",
    ]


# ---------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else a port the kernel says is free."""
    if preferred:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    return any_free_port()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its closing paren.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass(frozen=True)
class Recorded:
    name: str
    pid: int
    start_time: int

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start_time


def read_processes(directory: Path) -> list[Recorded]:
    path = directory / "processes.json"
    if not path.exists():
        return []
    return [Recorded(**entry) for entry in json.loads(path.read_text())]


def _write_processes(directory: Path, processes: Sequence[Recorded]) -> None:
    tmp = directory / "processes.json.tmp"
    tmp.write_text(json.dumps([p.__dict__ for p in processes], indent=1))
    tmp.rename(directory / "processes.json")


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(name: str, argv: list[str], logs: Path) -> subprocess.Popen[bytes]:
    with (logs / f"{name}.log").open("ab") as log:
        # A session of its own: `down` signals the whole group, and Ctrl-C in a test run does not hit it first.
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    _CHILDREN[proc.pid] = proc
    return proc


def _stop(processes: Sequence[Recorded]) -> None:
    """Stop newest first, one at a time: the apiserver shuts down cleanly only while etcd still runs."""
    for proc in reversed(processes):
        _stop_one(proc)


def _stop_one(proc: Recorded) -> None:
    for sig, patience in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        if not proc.alive():
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + patience
        while proc.alive() and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
    _reap()


def _reap() -> None:
    """Wait for exited children this process started, so none lingers as a zombie.

    Only our own Popen handles are waited on: a blanket waitpid(-1) would steal the exit status of other
    children of the test process (the local kubelet's containers).
    """
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _https_ok(url: str, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200 and response.read().strip() == b"ok")
    except (urllib.error.URLError, OSError):
        return False


def _http_json(url: str) -> object:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# up / down
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlPlane:
    directory: Path
    kubeconfig: Path
    server: str

    def stop(self) -> None:
        down(self.directory)


def _client_context(pki: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return context


def _start_until_ready(
    name: str,
    make_argv: Callable[[int], list[str]],
    ready: Callable[[int], bool],
    logs: Path,
    preferred_port: int | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a component on a free port; if it loses a race for the port, try again on another."""
    port = free_port(preferred_port)
    for attempt in range(PORT_ATTEMPTS):
        proc = _spawn(name, make_argv(port), logs)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready(port):
                return proc, port
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        else:
            proc.kill()
            proc.wait()
            _CHILDREN.pop(proc.pid, None)
            raise ClusterError(
                f"{name} was not ready in {READY_TIMEOUT_S:.0f}s: {_tail(logs / f'{name}.log')}"
            )
        tail = _tail(logs / f"{name}.log")
        if "address already in use" not in tail or attempt == PORT_ATTEMPTS - 1:
            raise ClusterError(f"{name} exited with code {proc.returncode}: {tail}")
        port = free_port()
    raise AssertionError("unreachable")


def up(directory: Path, *, apiserver_port: int | None = None, bin_dir: Path | None = None) -> ControlPlane:
    """Start etcd, kube-apiserver and kube-controller-manager; return once /readyz answers ok."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "kubeconfig"
    existing = read_processes(directory)
    if existing and all(p.alive() for p in existing) and config_path.exists():
        server = yaml.safe_load(config_path.read_text())["clusters"][0]["cluster"]["server"]
        return ControlPlane(directory, config_path, server)
    if existing:
        down(directory)  # a half-dead earlier run: clear it rather than fight over its data dir

    bin_dir = bin_dir or build()
    pki, logs = directory / "pki", directory / "logs"
    logs.mkdir(exist_ok=True)
    make_pki(pki)
    started: list[Recorded] = []

    def record(name: str, proc: subprocess.Popen[bytes]) -> None:
        start_time = proc_start_time(proc.pid)
        if start_time is not None:
            started.append(Recorded(name, proc.pid, start_time))
            _write_processes(directory, started)

    try:
        peer_port = free_port()
        etcd, etcd_port = _start_until_ready(
            "etcd",
            lambda port: etcd_args(bin_dir, directory / "etcd", port, peer_port),
            lambda port: _http_json(f"http://127.0.0.1:{port}/health") == {"health": "true", "reason": ""},
            logs,
        )
        record("etcd", etcd)
        context = _client_context(pki)
        apiserver, port = _start_until_ready(
            "kube-apiserver",
            lambda port: apiserver_args(bin_dir, pki, etcd_port, port),
            lambda port: _https_ok(f"https://127.0.0.1:{port}/readyz", context),
            logs,
            preferred_port=apiserver_port,
        )
        record("kube-apiserver", apiserver)
        server = f"https://127.0.0.1:{port}"
        config_path.write_text(yaml.safe_dump(kubeconfig(server, pki), sort_keys=False))
        config_path.chmod(0o600)
        manager = _spawn("kube-controller-manager", controller_manager_args(bin_dir, pki, config_path), logs)
        record("kube-controller-manager", manager)
    except BaseException:
        _stop(started)
        raise
    return ControlPlane(directory, config_path, server)


def down(directory: Path) -> list[str]:
    """Stop every process `up` recorded in DIR; return the names of those that were still running."""
    processes = read_processes(directory.resolve())
    running = [p.name for p in processes if p.alive()]
    _stop(processes)
    with contextlib.suppress(FileNotFoundError):
        (directory / "processes.json").unlink()
    return running


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubedistill_testing.cluster", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find cached) etcd, kube-apiserver, kube-controller-manager")
    up_parser = sub.add_parser("up", help="start the control plane; print the kubeconfig path")
    up_parser.add_argument("--dir", type=Path, required=True)
    up_parser.add_argument("--apiserver-port", type=int, help="preferred port (another if it is busy)")
    down_parser = sub.add_parser("down", help="stop what `up --dir DIR` started")
    down_parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build())
        elif args.command == "up":
            print(up(args.dir, apiserver_port=args.apiserver_port).kubeconfig)
        else:
            stopped = down(args.dir)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    except ClusterError as err:
        print(f"kubedistill: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
