"""The artifact store against a real S3 server (rclone serve s3 on loopback) and file://."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kubedistill import store
from kubedistill_testing.s3 import RcloneS3, free_port


@pytest.fixture(scope="module")
def s3() -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        server.create_bucket("artifacts")
        yield server


@pytest.fixture
def s3_env(s3: RcloneS3, monkeypatch: pytest.MonkeyPatch) -> RcloneS3:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(params=["s3", "file"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return f"s3://artifacts/{tmp_path.name}"
    return (tmp_path / "store").as_uri()


def test_round_trips(base: str) -> None:
    store.write_bytes(f"{base}/a/raw.bin", b"\x00\x01")
    store.write_text(f"{base}/a/t.txt", "héllo")
    store.write_json(f"{base}/a/b/r.json", {"x": [1, 2]})
    store.write_jsonl(f"{base}/a/b/rows.jsonl", [{"i": 1}, {"i": 2}])
    assert store.read_bytes(f"{base}/a/raw.bin") == b"\x00\x01"
    assert store.read_text(f"{base}/a/t.txt") == "héllo"
    assert store.read_json(f"{base}/a/b/r.json") == {"x": [1, 2]}
    assert store.read_jsonl(f"{base}/a/b/rows.jsonl") == [{"i": 1}, {"i": 2}]
    assert store.exists(f"{base}/a/t.txt")
    assert not store.exists(f"{base}/a/missing.txt")
    assert store.list_uris(f"{base}/a/b/") == [f"{base}/a/b/r.json", f"{base}/a/b/rows.jsonl"]
    assert store.list_uris(f"{base}/nothing/") == []
    # A partial name lists what starts with it (used for shard prefixes).
    assert store.list_uris(f"{base}/a/b/ro") == [f"{base}/a/b/rows.jsonl"]


def test_overwrite_replaces(base: str) -> None:
    store.write_text(f"{base}/x.txt", "one")
    store.write_text(f"{base}/x.txt", "two")
    assert store.read_text(f"{base}/x.txt") == "two"
    assert store.list_uris(f"{base}/") == [f"{base}/x.txt"]


def test_files_trees_and_delete(base: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "w.bin").write_bytes(b"w" * 3000)
    (src / "sub" / "c.json").write_text("{}")
    written = store.put_tree(src, f"{base}/tree")
    assert written == [f"{base}/tree/sub/c.json", f"{base}/tree/w.bin"]
    dest = tmp_path / "dest"
    got = store.get_tree(f"{base}/tree", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in got) == ["sub/c.json", "w.bin"]
    assert (dest / "w.bin").read_bytes() == b"w" * 3000
    store.get_file(f"{base}/tree/sub/c.json", tmp_path / "one.json")
    assert (tmp_path / "one.json").read_text() == "{}"
    assert store.delete_prefix(f"{base}/tree/") == 2
    assert store.list_uris(f"{base}/tree/") == []


def test_missing_object_is_not_found(base: str, tmp_path: Path) -> None:
    with pytest.raises(store.NotFound, match="no such artifact"):
        store.read_bytes(f"{base}/nope.json")
    with pytest.raises(store.NotFound):
        store.get_file(f"{base}/nope.json", tmp_path / "x")


def test_unreachable_endpoint_is_a_clear_typed_error(monkeypatch: pytest.MonkeyPatch, s3: RcloneS3) -> None:
    port = free_port()
    monkeypatch.setenv("KUBEDISTILL_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    with pytest.raises(store.StoreUnreachable) as err:
        store.write_json("s3://artifacts/k.json", {})
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "'artifacts'" in message
    assert s3.secret_key not in message and s3.access_key not in message
    assert err.value.reason == "StoreUnreachable"


def test_bad_credentials_and_missing_bucket(s3_env: RcloneS3, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(store.StoreUnreachable, match="bucket does not exist"):
        store.write_json("s3://no-such-bucket/k.json", {})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-access-key")
    with pytest.raises(store.StoreUnreachable, match="refused the credentials") as err:
        store.read_bytes("s3://artifacts/k.json")
    assert s3_env.secret_key not in str(err.value)


def test_uri_validation() -> None:
    with pytest.raises(store.InvalidURI):
        store.read_bytes("http://example.com/x")
    with pytest.raises(store.InvalidURI):
        store.read_bytes("s3:///no-bucket")
    assert store.join("s3://b/p/", "/x/", "y") == "s3://b/p/x/y"


def test_file_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    uri = (tmp_path / "d" / "f.jsonl").as_uri()
    store.write_jsonl(uri, [{"a": 1}])
    assert sorted(os.listdir(tmp_path / "d")) == ["f.jsonl"]


def test_processes_putting_the_same_file_at_once_all_succeed(tmp_path: Path) -> None:
    """The pods of a sharded stage write the same dataset files into one file:// store at once."""
    source = tmp_path / "dataset.jsonl"
    source.write_bytes(b'{"prompt": "p"}\n' * 50_000)
    uri = (tmp_path / "store" / "dataset" / "test.jsonl").as_uri()

    def put_many() -> None:
        for _ in range(20):
            store.put_file(source, uri)

    with ThreadPoolExecutor(max_workers=4) as pool:
        for done in [pool.submit(put_many) for _ in range(4)]:
            done.result()
    assert store.read_bytes(uri) == source.read_bytes()
