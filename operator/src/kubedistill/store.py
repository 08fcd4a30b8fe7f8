"""The artifact store: one set of functions over `s3://bucket/key` and `file:///abs/path` URIs.

    from kubedistill import store
    store.write_json("s3://artifacts/ns/job/uid/generate/result.json", {...})
    rows = store.read_jsonl("file:///tmp/work/generate/dataset/train.jsonl")
    store.list_uris("s3://artifacts/ns/job/uid/generate/candidates/")  # sorted full URIs

S3 goes through boto3: the endpoint comes from env KUBEDISTILL_S3_ENDPOINT (MinIO, rclone; unset =
AWS), credentials from the usual AWS_* variables, path-style addressing. Any failure to reach the
store (connection refused, bad credentials, missing bucket) raises `StoreUnreachable` whose message
names the endpoint and bucket and the kind of failure, never a credential. A missing object raises
`NotFound`. Writes to file:// are atomic (temp file + rename), so a killed stage never leaves half a
shard behind; S3 PUTs are atomic by nature.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ValidationError

from kubedistill.api.stage import S3_ENDPOINT_ENV

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


# Read size of a streamed S3 object: large enough for throughput, small against any memory limit.
LINE_CHUNK_BYTES = 1 << 20


class StoreError(Exception):
    reason = "StoreError"


class StoreUnreachable(StoreError):
    reason = "StoreUnreachable"


class NotFound(StoreError):
    reason = "ArtifactNotFound"


class InvalidURI(StoreError):
    reason = "InvalidURI"


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


class Backend(ABC):
    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None: ...

    @abstractmethod
    def iter_lines(self, uri: str) -> Iterator[bytes]:
        """The object's lines (without line ends), streamed in chunks: memory stays one chunk."""

    @abstractmethod
    def size(self, uri: str) -> int: ...

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def list_uris(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def put_file(self, path: str | Path, uri: str) -> None: ...

    @abstractmethod
    def get_file(self, uri: str, path: str | Path) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...


# ---------------------------------------------------------------------------------------- file://


def _local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise InvalidURI(f"not a file:///absolute/path URI: {uri}")
    return Path(unquote(parsed.path))


class FileBackend(Backend):
    def read_bytes(self, uri: str) -> bytes:
        path = _local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no such artifact: {uri}") from None
        except OSError as exc:
            raise StoreUnreachable(f"cannot read {uri}: {exc.strerror}") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = _local_path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StoreUnreachable(f"cannot write {uri}: {exc.strerror}") from None

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        path = _local_path(uri)
        try:
            with path.open("rb") as f:
                for line in f:
                    yield line.rstrip(b"\r\n")
        except FileNotFoundError:
            raise NotFound(f"no such artifact: {uri}") from None
        except OSError as exc:
            raise StoreUnreachable(f"cannot read {uri}: {exc.strerror}") from None

    def size(self, uri: str) -> int:
        try:
            return _local_path(uri).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no such artifact: {uri}") from None

    def exists(self, uri: str) -> bool:
        return _local_path(uri).is_file()

    def list_uris(self, prefix: str) -> list[str]:
        root = _local_path(prefix)
        # A prefix ending in "/" is a directory; otherwise it may also be a partial file name.
        base, stem = (root, "") if prefix.endswith("/") or root.is_dir() else (root.parent, root.name)
        if not base.is_dir():
            return []
        found = [
            p
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".") and str(p.relative_to(base)).startswith(stem)
        ]
        return sorted(p.as_uri() for p in found)

    def put_file(self, path: str | Path, uri: str) -> None:
        dest = _local_path(uri)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # A temp name of its own: the pods of a sharded stage write the same dataset files at once.
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            os.close(fd)
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except OSError as exc:
            raise StoreUnreachable(f"cannot write {uri}: {exc.strerror}") from None

    def get_file(self, uri: str, path: str | Path) -> None:
        src = _local_path(uri)
        if not src.is_file():
            raise NotFound(f"no such artifact: {uri}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)

    def delete_prefix(self, prefix: str) -> int:
        uris = self.list_uris(prefix)
        for uri in uris:
            _local_path(uri).unlink(missing_ok=True)
        return len(uris)


# ------------------------------------------------------------------------------------------ s3://


def _bucket_key(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidURI(f"not an s3://bucket/key URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


class S3Backend(Backend):
    def __init__(self, endpoint: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = endpoint
        # A session of its own: boto3's default session caches the first credentials it resolves.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )

    def _where(self, bucket: str) -> str:
        return f"S3 endpoint {self.endpoint or 'AWS default'}, bucket {bucket!r}"

    def _translate(self, exc: Exception, uri: str, bucket: str) -> StoreError:
        """A StoreError that names the place and the kind of failure, never a credential."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"no such artifact: {uri}")
            if code == "NoSuchBucket":
                return StoreUnreachable(
                    f"artifact store unusable: bucket does not exist ({self._where(bucket)})"
                )
            if (
                code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
                or status == 403
            ):
                return StoreUnreachable(
                    f"artifact store refused the credentials ({code}) at {self._where(bucket)}; "
                    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                )
            return StoreUnreachable(f"artifact store error {code} (HTTP {status}) at {self._where(bucket)}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreUnreachable(
                f"no S3 credentials for {self._where(bucket)}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return StoreUnreachable(
            f"cannot reach the artifact store ({type(exc).__name__}) at {self._where(bucket)}"
        )

    def _call(self, uri: str, bucket: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, uri, bucket) from None

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = _bucket_key(uri)
        response = self._call(uri, bucket, self.client.get_object, Bucket=bucket, Key=key)
        body: bytes = self._call(uri, bucket, response["Body"].read)
        return body

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = _bucket_key(uri)
        self._call(uri, bucket, self.client.put_object, Bucket=bucket, Key=key, Body=data)

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        bucket, key = _bucket_key(uri)
        response = self._call(uri, bucket, self.client.get_object, Bucket=bucket, Key=key)
        lines = iter(response["Body"].iter_lines(chunk_size=LINE_CHUNK_BYTES))
        while True:
            line = self._call(uri, bucket, lambda: next(lines, None))
            if line is None:
                return
            yield line.rstrip(b"\r")

    def size(self, uri: str) -> int:
        bucket, key = _bucket_key(uri)
        head = self._call(uri, bucket, self.client.head_object, Bucket=bucket, Key=key)
        return int(head["ContentLength"])

    def exists(self, uri: str) -> bool:
        bucket, key = _bucket_key(uri)
        try:
            self._call(uri, bucket, self.client.head_object, Bucket=bucket, Key=key)
        except NotFound:
            return False
        return True

    def _keys(self, prefix: str) -> Iterator[tuple[str, str]]:
        bucket, key_prefix = _bucket_key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(prefix, bucket, lambda: list(paginator.paginate(Bucket=bucket, Prefix=key_prefix)))
        for page in pages:
            for obj in page.get("Contents", []):
                yield bucket, obj["Key"]

    def list_uris(self, prefix: str) -> list[str]:
        return sorted(f"s3://{bucket}/{key}" for bucket, key in self._keys(prefix))

    def put_file(self, path: str | Path, uri: str) -> None:
        bucket, key = _bucket_key(uri)
        self._call(uri, bucket, self.client.upload_file, Filename=str(path), Bucket=bucket, Key=key)

    def get_file(self, uri: str, path: str | Path) -> None:
        bucket, key = _bucket_key(uri)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._call(uri, bucket, self.client.download_file, Bucket=bucket, Key=key, Filename=str(path))

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self._keys(prefix))
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            bucket = batch[0][0]
            self._call(
                prefix,
                bucket,
                self.client.delete_objects,
                Bucket=bucket,
                Delete={"Objects": [{"Key": k} for _, k in batch], "Quiet": True},
            )
        return len(keys)


# ------------------------------------------------------------------------------------ dispatch


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, _credentials: tuple[str, str]) -> S3Backend:
    return S3Backend(endpoint)


_FILE = FileBackend()


def backend(uri: str) -> Backend:
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return _FILE
    if scheme == "s3":
        # Keyed on the environment so a test (or local mode) that changes endpoint/credentials gets
        # a fresh client; the credentials are only a cache key, never stored elsewhere.
        creds = (os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
        return _s3(os.environ.get(S3_ENDPOINT_ENV) or None, creds)
    raise InvalidURI(f"unsupported artifact URI (want s3:// or file://): {uri}")


def read_bytes(uri: str) -> bytes:
    return backend(uri).read_bytes(uri)


def write_bytes(uri: str, data: bytes) -> None:
    backend(uri).write_bytes(uri, data)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def read_model(uri: str, model: type[M]) -> M | None:
    """A JSON artifact as a model (a stage's result.json or progress.json); None when it is not there
    yet, or cannot be read, which is logged: writes are atomic, so that is never a half-written file."""
    try:
        return model.model_validate_json(read_bytes(uri))
    except NotFound:
        return None
    except (StoreError, ValidationError, UnicodeDecodeError) as err:
        log.warning("cannot read %s: %s", uri, type(err).__name__)
        return None


def iter_lines(uri: str) -> Iterator[bytes]:
    """Lines of an object as they arrive, whatever its size: for datasets and shards read as a stream."""
    return backend(uri).iter_lines(uri)


def size(uri: str) -> int:
    return backend(uri).size(uri)


def iter_jsonl(uri: str) -> Iterator[Any]:
    for line in iter_lines(uri):
        if line.strip():
            yield json.loads(line)


def read_jsonl(uri: str) -> list[Any]:
    return [json.loads(line) for line in read_text(uri).splitlines() if line.strip()]


def dumps_jsonl(rows: Iterable[Any]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows).encode(
        "utf-8"
    )


def write_jsonl(uri: str, rows: Iterable[Any]) -> None:
    write_bytes(uri, dumps_jsonl(rows))


def exists(uri: str) -> bool:
    return backend(uri).exists(uri)


def list_uris(prefix: str) -> list[str]:
    return backend(prefix).list_uris(prefix)


def put_file(path: str | Path, uri: str) -> None:
    backend(uri).put_file(path, uri)


def get_file(uri: str, path: str | Path) -> None:
    backend(uri).get_file(uri, path)


def delete_prefix(prefix: str) -> int:
    return backend(prefix).delete_prefix(prefix)


def put_tree(directory: str | Path, prefix: str) -> list[str]:
    """Upload every file under `directory` below `prefix`; returns the URIs written."""
    root = Path(directory)
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        uri = join(prefix, path.relative_to(root).as_posix())
        put_file(path, uri)
        written.append(uri)
    return written


def get_tree(prefix: str, directory: str | Path) -> list[Path]:
    """Download every object below `prefix` into `directory`, keeping relative paths."""
    base = prefix.rstrip("/") + "/"
    paths = []
    for uri in list_uris(base):
        path = Path(directory) / uri[len(base) :]
        get_file(uri, path)
        paths.append(path)
    return paths
