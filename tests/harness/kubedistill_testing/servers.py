"""The real model servers the serve path drives: llama.cpp's own `llama-server` and the LiteLLM proxy.

Both are built once per machine and cached under ``$KUBEDISTILL_CACHE`` (default ``~/.cache/kubedistill``)
in a directory named after what pins them, with a lock, like the control plane (:mod:`.cluster`):

- ``llama-server-<llama-cpp-python pin>-<flags hash>/``: ``llama-server`` and llama.cpp's shared libraries,
  built once with CMake from the llama.cpp source that the llama-cpp-python sdist vendors (the bootstrap
  extracts it to ``llama.cpp-<pin>``): Release, no network code (no curl, no OpenSSL, no web UI download).
  Its ``wheel/`` holds llama-cpp-python's wheel, built with its own compile of llama.cpp switched off and
  given these libraries instead, so a cold machine compiles llama.cpp once, not twice (19–22 CPU-minutes
  instead of about twice that);
- ``litellm-<hash of scripts/litellm-requirements.txt>/``: a virtualenv of its own holding ``litellm[proxy]``
  with every dependency pinned, so the proxy's large dependency set never touches the product's ``.venv``.

The local kubelet maps the upstream images to these (``ghcr.io/ggml-org/llama.cpp:server`` →
``llama-server``, ``ghcr.io/berriai/litellm`` → the venv's ``litellm``), and the bootstrap links both into
``.venv/bin`` so local mode finds them on PATH.

Command line::

    python -m kubedistill_testing.servers wheel --sdist llama_cpp_python-<pin>.tar.gz   # prints its path
    python -m kubedistill_testing.servers litellm                                        # prints its entry
    python -m kubedistill_testing.servers build [--link-into .venv/bin]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from collections.abc import Sequence
from pathlib import Path

from kubedistill_testing.cache import cache_root, file_lock
from kubedistill_testing.paths import RepoRootMissing, repo_root

LLAMA_SERVER = "llama-server"
LITELLM = "litellm"
LITELLM_REQUIREMENTS = Path("scripts") / "litellm-requirements.txt"
COMPLETE = ".complete"
# Everything but the server and the libraries is off: tests, examples, the other tools, the unified app, the
# web UI (and its download), and every network client the server does not need to answer on loopback.
# Shared libraries, because llama-cpp-python loads these same ones (see llama_cpp_python_wheel); rpaths
# relative to $ORIGIN, because they are copied out of the build tree. No native CPU flags: a native build
# dies with SIGILL on AMX hosts; the AVX2/FMA/F16C baseline stays on.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
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
# llama-cpp-python's own CMake options: build its bindings without compiling llama.cpp (or its llava/mtmd).
WHEEL_CMAKE_ARGS = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
WHEEL_LIBRARY_DIR = "llama_cpp/lib"


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


def is_shared_library(name: str) -> bool:
    return name.startswith("lib") and (name.endswith(".so") or ".so." in name)


def build_llama_cpp(root: Path | None = None) -> Path:
    """The cached directory of llama-server and llama.cpp's shared libraries, built first if needed.

    ~20 CPU-minutes; the libraries' rpaths are $ORIGIN, so the directory can be linked to from anywhere."""
    pin = llama_cpp_pin(((root or repo_root()) / "pyproject.toml").read_text())
    target = llama_server_dir(pin)
    if (target / LLAMA_SERVER).is_file():
        return target
    source = llama_source_dir(pin)
    if not (source / "tools" / "server").is_dir():
        raise ServerBuildError(
            f"the llama.cpp source is not at {source}: scripts/bootstrap.sh extracts it from the "
            "llama-cpp-python sdist (or set KUBEDISTILL_LLAMA_CPP_DIR to a llama.cpp checkout)"
        )
    cmake = shutil.which("cmake")
    if cmake is None:
        raise ServerBuildError("cmake is needed to build llama.cpp once per machine: install cmake")
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f"{target.name}.lock"):
        if (target / LLAMA_SERVER).is_file():
            return target  # another process built it while we waited for the lock
        partial = target.with_name(target.name + ".partial")
        # An interrupted build resumes: its build tree has the same flags (they name the directory).
        build_dir = partial / "build"
        build_dir.mkdir(parents=True, exist_ok=True)
        log = target.with_name(target.name + ".build.log")
        jobs = str(os.cpu_count() or 2)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _say(
            f"building llama.cpp {pin} (llama-server and its libraries; once per machine, ~10 min on 2 idle cores)"
        )
        started = time.monotonic()
        _run_logged([cmake, "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_FLAGS], log, "cmake")
        _run_logged(
            [cmake, "--build", str(build_dir), "--target", LLAMA_SERVER, "--parallel", jobs],
            log,
            "building llama-server",
        )
        built = build_dir / "bin"
        if not (built / LLAMA_SERVER).is_file():
            raise ServerBuildError(f"the build finished without bin/{LLAMA_SERVER} (log: {log})")
        for item in built.iterdir():
            if item.name == LLAMA_SERVER or is_shared_library(item.name):
                shutil.copy2(item, partial / item.name, follow_symlinks=False)
        shutil.rmtree(build_dir)
        # With the build tree gone, only the $ORIGIN rpaths can find the libraries: prove they do.
        _run_logged(
            [str(partial / LLAMA_SERVER), "--version"], log, "running the built llama-server", timeout=60
        )
        _say(f"  llama.cpp built in {time.monotonic() - started:.0f} s ({_children_cpu_s():.0f} s of CPU)")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def build_llama_server(root: Path | None = None) -> Path:
    """The path of the cached llama-server binary, building llama.cpp first if needed."""
    return build_llama_cpp(root) / LLAMA_SERVER


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def bundle_libraries(wheel: Path, libraries: Sequence[Path], out: Path) -> None:
    """Write `wheel` to `out` with `libraries` added under llama_cpp/lib/ and its RECORD made anew.

    A symlinked library is stored as a copy under each name (a wheel holds no links), as llama-cpp-python's
    own wheels do."""
    with zipfile.ZipFile(wheel) as source:
        record = next((n for n in source.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise ServerBuildError(f"{wheel.name} has no RECORD")
        entries = [(info, source.read(info)) for info in source.infolist() if info.filename != record]
    for library in libraries:
        info = zipfile.ZipInfo(f"{WHEEL_LIBRARY_DIR}/{library.name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o755 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        entries.append((info, library.read_bytes()))
    rows = [f"{info.filename},{_record_hash(data)},{len(data)}" for info, data in entries]
    rows.append(f"{record},,")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as bundled:
        for info, data in entries:
            bundled.writestr(info, data)
        bundled.writestr(record, "\n".join(rows) + "\n")


def llama_cpp_python_wheel(sdist: Path, root: Path | None = None) -> Path:
    """llama-cpp-python's wheel for the product's .venv, carrying the libraries of :func:`build_llama_cpp`.

    Its own build compiles only the bindings (seconds), so llama.cpp is compiled once per machine."""
    libraries_dir = build_llama_cpp(root)
    wheel_dir = libraries_dir / "wheel"
    found = sorted(wheel_dir.glob("*.whl"))
    if found:
        return found[0]
    with file_lock(libraries_dir.parent / f"{libraries_dir.name}.wheel.lock"):
        found = sorted(wheel_dir.glob("*.whl"))
        if found:
            return found[0]
        log = libraries_dir.with_name(libraries_dir.name + ".build.log")
        partial = wheel_dir.with_name("wheel.partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            plain_dir = Path(tmp)
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "-q", "--no-deps"]
            _run_logged(
                [*pip, "--no-cache-dir", "-w", str(plain_dir), str(sdist)],
                log,
                "building the llama-cpp-python wheel",
                env={**os.environ, "CMAKE_ARGS": WHEEL_CMAKE_ARGS},
            )
            plain = next(plain_dir.glob("*.whl"))
            libraries = sorted(p for p in libraries_dir.iterdir() if is_shared_library(p.name))
            bundle_libraries(plain, libraries, partial / plain.name)
            partial.rename(wheel_dir)
    return next(wheel_dir.glob("*.whl"))


def build_litellm(root: Path | None = None) -> Path:
    """The path of the cached virtualenv's `litellm` entry point, installing it first if needed."""
    requirements_file = (root or repo_root()) / LITELLM_REQUIREMENTS
    target = litellm_dir(requirements_file.read_text())
    entry, complete = target / "bin" / LITELLM, target / COMPLETE
    if complete.is_file():
        return entry
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f"{target.name}.lock"):
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
    wheel_parser = sub.add_parser(
        "wheel", help="build (or find cached) llama.cpp and llama-cpp-python's wheel"
    )
    wheel_parser.add_argument("--sdist", type=Path, required=True, help="the llama-cpp-python sdist")
    sub.add_parser("litellm", help="install (or find cached) the LiteLLM proxy's virtualenv")
    args = parser.parse_args(argv)
    try:
        if args.command == "wheel":
            print(llama_cpp_python_wheel(args.sdist))
            return 0
        if args.command == "litellm":
            print(build_litellm())
            return 0
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
