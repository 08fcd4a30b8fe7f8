"""The real model servers the serve path drives: llama.cpp's own `llama-server` and the LiteLLM proxy.

Both are built once per machine and cached under ``$KUBEDISTILL_CACHE`` (default ``~/.cache/kubedistill``)
in a directory named after what pins them, with a lock, like the control plane (:mod:`.cluster`):

- ``llama-server-<llama-cpp-python pin>-<flags hash>/llama-server``: built with CMake from the llama.cpp
  source that the llama-cpp-python sdist vendors (the bootstrap extracts it to ``llama.cpp-<pin>``), only
  the ``llama-server`` target, Release, static, no network code (no curl, no OpenSSL, no web UI download);
- ``litellm-<hash of scripts/litellm-requirements.txt>/``: a virtualenv of its own holding ``litellm[proxy]``
  with every dependency pinned, so the proxy's large dependency set never touches the product's ``.venv``.

The local kubelet maps the upstream images to these (``ghcr.io/ggml-org/llama.cpp:server`` →
``llama-server``, ``ghcr.io/berriai/litellm`` → the venv's ``litellm``), and the bootstrap links both into
``.venv/bin`` so local mode finds them on PATH.

Command line::

    python -m kubedistill_testing.servers build [--link-into .venv/bin]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from pathlib import Path

from kubedistill_testing.cluster import _file_lock, cache_root
from kubedistill_testing.paths import RepoRootMissing, repo_root

LLAMA_SERVER = "llama-server"
LITELLM = "litellm"
LITELLM_REQUIREMENTS = Path("scripts") / "litellm-requirements.txt"
COMPLETE = ".complete"
# Everything but the server is off: tests, examples, the other tools, the unified app, the web UI (and its
# download), and every network client the server does not need to answer on loopback. Static, so the one
# binary can be linked anywhere. No native CPU flags: a native build dies with SIGILL on AMX hosts (as the
# llama-cpp-python wheel's, see scripts/bootstrap.sh); the AVX2/FMA/F16C baseline stays on.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
)


class ServerBuildError(RuntimeError):
    """A server could not be built; the message is one line and names the log."""


def llama_cpp_pin(pyproject: str) -> str:
    """The llama-cpp-python version the product pins: its sdist vendors the llama.cpp we build."""
    match = re.search(r'"llama-cpp-python(?:\[[^\]]*\])?==([^"]+)"', pyproject)
    if not match:
        raise ServerBuildError("pyproject.toml does not pin llama-cpp-python")
    return match.group(1)


def flags_key(flags: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(flags).encode()).hexdigest()[:8]


def llama_server_dir(pin: str) -> Path:
    return cache_root() / f"llama-server-{pin}-{flags_key(CMAKE_FLAGS)}"


def llama_source_dir(pin: str) -> Path:
    """Where scripts/bootstrap.sh extracts the sdist's vendor/llama.cpp (the export stage's converter too)."""
    return Path(os.environ.get("KUBEDISTILL_LLAMA_CPP_DIR") or cache_root() / f"llama.cpp-{pin}")


def litellm_dir(requirements: str) -> Path:
    return cache_root() / f"litellm-{hashlib.sha256(requirements.encode()).hexdigest()[:12]}"


def _say(message: str) -> None:
    print(f"kubedistill: {message}", file=sys.stderr, flush=True)


def _children_cpu_s() -> float:
    """CPU seconds used by this process's finished children: a build's cost apart from the machine's load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_logged(cmd: Sequence[str], log: Path, what: str, **kwargs: object) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        result = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ServerBuildError(f"{what} failed: {tail[0].strip()} (full log: {log})")


def build_llama_server(root: Path | None = None) -> Path:
    """The path of a cached llama-server binary, building it first if needed (~10 min on 2 cores)."""
    pin = llama_cpp_pin(((root or repo_root()) / "pyproject.toml").read_text())
    target = llama_server_dir(pin)
    binary = target / LLAMA_SERVER
    if binary.is_file():
        return binary
    source = llama_source_dir(pin)
    if not (source / "tools" / "server").is_dir():
        raise ServerBuildError(
            f"the llama.cpp source is not at {source}: scripts/bootstrap.sh extracts it from the "
            "llama-cpp-python sdist (or set KUBEDISTILL_LLAMA_CPP_DIR to a llama.cpp checkout)"
        )
    cmake = shutil.which("cmake")
    if cmake is None:
        raise ServerBuildError("cmake is needed to build llama-server once per machine: install cmake")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{target.name}.lock"):
        if binary.is_file():
            return binary  # another process built it while we waited for the lock
        partial = target.with_name(target.name + ".partial")
        # An interrupted build resumes: its build tree has the same flags (they name the directory).
        build_dir = partial / "build"
        build_dir.mkdir(parents=True, exist_ok=True)
        log = target.with_name(target.name + ".build.log")
        jobs = str(os.cpu_count() or 2)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _say(f"building llama-server from llama.cpp {pin}'s source (once per machine, ~10 min on 2 cores)")
        started = time.monotonic()
        _run_logged([cmake, "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_FLAGS], log, "cmake")
        _run_logged(
            [cmake, "--build", str(build_dir), "--target", LLAMA_SERVER, "--parallel", jobs],
            log,
            "building llama-server",
        )
        built = next(build_dir.rglob(LLAMA_SERVER), None)
        if built is None or not built.is_file():
            raise ServerBuildError(f"the build finished without a {LLAMA_SERVER} binary (log: {log})")
        shutil.copy2(built, partial / LLAMA_SERVER)
        shutil.rmtree(build_dir)
        _say(f"  llama-server built in {time.monotonic() - started:.0f} s ({_children_cpu_s():.0f} s of CPU)")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return binary


def build_litellm(root: Path | None = None) -> Path:
    """The path of the cached virtualenv's `litellm` entry point, installing it first if needed."""
    requirements_file = (root or repo_root()) / LITELLM_REQUIREMENTS
    target = litellm_dir(requirements_file.read_text())
    entry, complete = target / "bin" / LITELLM, target / COMPLETE
    if complete.is_file():
        return entry
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f"{target.name}.lock"):
        if complete.is_file():
            return entry
        # Built in place (a venv's scripts name its interpreter by absolute path); complete only once marked.
        shutil.rmtree(target, ignore_errors=True)
        log = target.with_name(target.name + ".install.log")
        log.write_text("")
        _say("installing the LiteLLM proxy into a virtualenv of its own (once per machine)")
        started = time.monotonic()
        venv.EnvBuilder(with_pip=True).create(target)
        pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "-q"]
        _run_logged([*pip, "--no-deps", "-r", str(requirements_file)], log, "installing litellm[proxy]")
        if not entry.is_file():
            raise ServerBuildError(f"litellm[proxy] installed without a {LITELLM} entry point (log: {log})")
        complete.write_text("")
        _say(f"  LiteLLM proxy installed in {time.monotonic() - started:.0f} s")
    return entry


LLAMA_SERVER_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
LITELLM_IMAGE = "ghcr.io/berriai/litellm"


def server_images() -> dict[str, list[str]]:
    """The local kubelet's image map for the upstream server images, for those built on this machine.

    Both images' entrypoints take the container's args as the server's own flags (llama.cpp's is
    /app/llama-server; LiteLLM's runs `litellm "$@"`), so each maps to the bare program. An image not
    built yet stays unmapped: its Pods wait with ErrImageNeverPull, saying so."""
    try:
        root = repo_root()
        pin = llama_cpp_pin((root / "pyproject.toml").read_text())
        litellm = litellm_dir((root / LITELLM_REQUIREMENTS).read_text())
    except (RepoRootMissing, ServerBuildError, OSError):
        return {}
    found = {
        LLAMA_SERVER_IMAGE: llama_server_dir(pin) / LLAMA_SERVER,
        LITELLM_IMAGE: litellm / "bin" / LITELLM if (litellm / COMPLETE).is_file() else None,
    }
    return {image: [str(path)] for image, path in found.items() if path is not None and path.is_file()}


def link_into(directory: Path, binaries: dict[str, Path]) -> None:
    """Symlink each binary into `directory` (e.g. .venv/bin) under its name, replacing an older link."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in binaries.items():
        link = directory / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubedistill_testing.servers", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="build (or find cached) llama-server and the LiteLLM proxy")
    build_parser.add_argument("--link-into", type=Path, help="symlink both into this directory")
    args = parser.parse_args(argv)
    try:
        binaries = {LLAMA_SERVER: build_llama_server(), LITELLM: build_litellm()}
    except ServerBuildError as err:
        _say(str(err))
        return 1
    if args.link_into:
        link_into(args.link_into, binaries)
    for path in binaries.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
