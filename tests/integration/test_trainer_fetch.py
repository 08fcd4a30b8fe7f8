"""`python -m kubedistill_trainer fetch`: the model server's init container, against a real S3 server.

A present GGUF is copied byte for byte; a missing one, or wrong credentials, exit 1 with one line in the
termination log (what the operator shows on the alias as the pod's own message).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubedistill import store
from kubedistill_testing.s3 import RcloneS3


def fetch(uri: str, out: Path, env: dict[str, str], log: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubedistill_trainer", "fetch", "--uri", uri, "--out", str(out)],
        env={**os.environ, **env, "KUBEDISTILL_TERMINATION_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> RcloneS3:
    with RcloneS3() as server:
        server.create_bucket("models")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server


def test_fetch_copies_from_s3_and_reports_what_is_missing(s3: RcloneS3, tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    store.write_bytes("s3://models/a/model.gguf", payload)
    out, log = tmp_path / "models" / "model.gguf", tmp_path / "termination-log"
    done = fetch("s3://models/a/model.gguf", out, s3.env(), log)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == payload and not out.with_name("model.gguf.partial").exists()

    missing = fetch("s3://models/a/nope.gguf", tmp_path / "m2.gguf", s3.env(), log)
    assert missing.returncode == 1
    assert log.read_text() == "s3://models/a/nope.gguf does not exist"
    assert not (tmp_path / "m2.gguf").exists()

    wrong = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    denied = fetch("s3://models/a/model.gguf", tmp_path / "m3.gguf", wrong, log)
    assert denied.returncode == 1 and "s3://models/a/model.gguf" in log.read_text()
    assert "wrong" not in log.read_text()  # a credential never reaches the message


def test_fetch_file_uri(tmp_path: Path) -> None:
    source = tmp_path / "student.gguf"
    source.write_bytes(b"GGUF-bytes")
    out, log = tmp_path / "out" / "model.gguf", tmp_path / "log"
    assert fetch(source.as_uri(), out, {}, log).returncode == 0
    assert out.read_bytes() == b"GGUF-bytes"
