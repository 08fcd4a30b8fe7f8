"""The llama-cpp-python wheel the bootstrap builds: the bindings' wheel given llama.cpp's shared libraries."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from kubedistill_testing.servers import ServerBuildError, bundle_libraries, is_shared_library

DIST_INFO = "llama_cpp_python-0.3.36.dist-info"


def _plain_wheel(path: Path) -> Path:
    files = {
        "llama_cpp/__init__.py": b"from .llama_cpp import *\n",
        f"{DIST_INFO}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-linux_x86_64\n",
        f"{DIST_INFO}/RECORD": b"stale,,\n",
    }
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_the_libraries_land_in_the_package_and_the_record_describes_every_file(tmp_path: Path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "libllama.so.0.5.0").write_bytes(b"\x7fELF llama")
    (libs / "libllama.so.0").symlink_to("libllama.so.0.5.0")
    out = tmp_path / "out" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"

    bundle_libraries(_plain_wheel(tmp_path / "plain.whl"), sorted(libs.iterdir()), out)

    with zipfile.ZipFile(out) as wheel:
        names = set(wheel.namelist())
        # The link is stored as a copy under its own name: the loader asks for the soname.
        assert wheel.read("llama_cpp/lib/libllama.so.0") == b"\x7fELF llama"
        assert wheel.read("llama_cpp/lib/libllama.so.0.5.0") == b"\x7fELF llama"
        rows = [row.split(",") for row in wheel.read(f"{DIST_INFO}/RECORD").decode().splitlines()]
        recorded = {name: (digest, size) for name, digest, size in rows}
        assert set(recorded) == names
        assert recorded[f"{DIST_INFO}/RECORD"] == ("", "")
        for name in names - {f"{DIST_INFO}/RECORD"}:
            data = wheel.read(name)
            assert recorded[name] == (_digest(data), str(len(data)))
        assert wheel.getinfo("llama_cpp/lib/libllama.so.0").external_attr >> 16 == 0o755


def test_a_wheel_without_a_record_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.whl"
    with zipfile.ZipFile(plain, "w") as wheel:
        wheel.writestr("llama_cpp/__init__.py", "")
    with pytest.raises(ServerBuildError, match="no RECORD"):
        bundle_libraries(plain, [], tmp_path / "out.whl")


@pytest.mark.parametrize(
    ("name", "shared"),
    [
        ("libllama.so", True),
        ("libggml-base.so.0.25.3", True),
        ("llama-server", False),
        ("libsomething.a", False),
        ("notlib.so", False),
    ],
)
def test_which_build_outputs_are_libraries(name: str, shared: bool) -> None:
    assert is_shared_library(name) is shared
