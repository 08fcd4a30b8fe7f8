"""Container logs, and the kubelet API's container-logs endpoint the API server proxies `kubectl logs` to.

Each container run writes its stdout and stderr to ``<container>.log``; a restart moves that file to
``<container>.previous.log`` first, as a node keeps the log of the last terminated run for ``--previous``.

The server answers ``GET /containerLogs/{namespace}/{pod}/{container}`` with ``follow``, ``previous``,
``tailLines`` and ``limitBytes`` over HTTPS. A client must present a certificate from the cluster CA
(the API server's ``--kubelet-client-certificate``), and the API server must then allow that user
``get`` on ``nodes/proxy`` for this Node (a SubjectAccessReview, as a kubelet in webhook mode asks).
Lines are stored without their time, so ``timestamps``, ``sinceSeconds`` and ``sinceTime`` get a
400 that says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

UNSUPPORTED_QUERY = ("timestamps", "sinceSeconds", "sinceTime")
FOLLOW_POLL_S = 0.1
_CHUNK = 64 * 1024
_PATH = re.compile(r"^/containerLogs/([^/]+)/([^/]+)/([^/]+)$")


def previous_path(current: Path) -> Path:
    return current.with_name(current.name.removesuffix(".log") + ".previous.log")


def read_head(path: Path, limit: int) -> str:
    """Up to `limit` bytes from the start of a file, as text; empty if it cannot be read."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def read_tail(path: Path, limit: int) -> str:
    """Up to `limit` bytes from the end of a file, as text; empty if it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def tail_of(data: bytes, lines: int) -> bytes:
    """The last `lines` lines of `data`; a final line without a newline counts as one."""
    if lines <= 0:
        return b""
    body = data[:-1] if data.endswith(b"\n") else data
    cut = len(body)
    for _ in range(lines):
        cut = body.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]


def read_tail_lines(path: Path, lines: int) -> tuple[bytes, int]:
    """The last `lines` lines of a file, read from its end, and the file's size then."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        position, data = size, b""
        # One newline more than the lines asked for marks where the first kept line starts.
        while position > 0 and data.count(b"\n") <= lines:
            step = min(_CHUNK, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
        return tail_of(data, lines), size


@dataclass(frozen=True)
class LogQuery:
    follow: bool = False
    previous: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None


class BadQuery(ValueError):
    pass


def parse_query(query: str) -> LogQuery:
    """The kubelet's reading of the query string the API server builds from PodLogOptions."""
    params = {key: values[-1] for key, values in urllib.parse.parse_qs(query).items()}
    unsupported = [name for name in UNSUPPORTED_QUERY if params.get(name) not in (None, "", "false")]
    if unsupported:
        raise BadQuery(f"the local kubelet keeps no timestamps: {', '.join(unsupported)} is not supported")

    def number(name: str) -> int | None:
        if name not in params:
            return None
        try:
            value = int(params[name])
        except ValueError:
            raise BadQuery(f"{name} must be an integer, not {params[name]!r}") from None
        if value < 0:
            raise BadQuery(f"{name} must not be negative")
        return value

    return LogQuery(
        follow=params.get("follow") == "true",
        previous=params.get("previous") == "true",
        tail_lines=number("tailLines"),
        limit_bytes=number("limitBytes"),
    )


class LogError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LogSource(Protocol):
    """What the server needs from the kubelet: a container's log file and whether that run still writes."""

    def log_file(self, namespace: str, pod: str, container: str, previous: bool) -> Path:
        """The file to read; raises LogError (404 unknown pod, 400 unknown container or no such run)."""

    def still_running(self, namespace: str, pod: str, container: str) -> bool: ...


def stream_log(
    path: Path,
    query: LogQuery,
    write: Callable[[bytes], None],
    still_writing: Callable[[], bool],
    stop: threading.Event,
) -> None:
    """Write the log (its tail, up to limitBytes), then with follow what the run adds until it ends."""
    budget = query.limit_bytes if query.limit_bytes is not None else -1

    def send(data: bytes) -> bool:
        nonlocal budget
        if budget >= 0:
            data = data[:budget]
            budget -= len(data)
        if data:
            write(data)
        return budget != 0

    if query.tail_lines is not None:
        data, offset = read_tail_lines(path, query.tail_lines)
    else:
        data, offset = b"", 0
    with path.open("rb") as handle:
        inode = os.fstat(handle.fileno()).st_ino
        if not send(data):
            return
        handle.seek(offset)
        while True:
            chunk = handle.read(_CHUNK)
            if chunk:
                if not send(chunk):
                    return
                continue
            if not query.follow or stop.is_set():
                return
            # The run is over once its process has exited or a restart has rotated its file away.
            rotated = not path.exists() or path.stat().st_ino != inode
            if rotated or not still_writing():
                tail = handle.read()
                if tail:
                    send(tail)
                return
            stop.wait(FOLLOW_POLL_S)


# ---------------------------------------------------------------------------------------------------
# The HTTPS server
# ---------------------------------------------------------------------------------------------------


def self_signed_certificate(directory: Path, host: str) -> tuple[Path, Path]:
    """A serving certificate for the kubelet API, self-signed as a kubelet's is by default."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "365", "-subj", f"/CN={host}@local-kubelet",
         "-addext", f"subjectAltName=IP:{host}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"openssl could not make the kubelet's serving certificate: {result.stderr}")
    return cert, key


def peer_identity(cert: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(user, groups) of a client certificate, as Kubernetes reads them: CN and O."""
    fields = [item for rdn in cert.get("subject", ()) for item in rdn]
    user = next((value for key, value in fields if key == "commonName"), "")
    return user, [value for key, value in fields if key == "organizationName"]


Authorizer = Callable[[str, list[str]], bool]


class LogServer(ThreadingHTTPServer):
    """The kubelet API's logs endpoint on `host`:`port` (0: any free port; see `.port`)."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        source: LogSource,
        authorize: Authorizer,
        *,
        client_ca: str,
        certificate: tuple[Path, Path],
        port: int = 0,
    ) -> None:
        super().__init__((host, port), _Handler)
        self.source = source
        self.authorize = authorize
        self.stopping = threading.Event()
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self.tls.load_verify_locations(cafile=client_ca)
        self.tls.verify_mode = ssl.CERT_REQUIRED
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake happens in the request's own thread, so a slow client does not block accept().
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as err:
            log.debug("kubelet API: TLS handshake with %s failed: %s", client_address, err)
            return
        with contextlib.closing(wrapped):
            super().finish_request(wrapped, client_address)

    def start(self) -> LogServer:
        self._thread = threading.Thread(target=self.serve_forever, name="kubelet-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        if self._thread:
            self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: LogServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("kubelet API: " + format, *args)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        match = _PATH.match(url.path)
        if not match:
            return self._error(404, f"{url.path} is not served by the local kubelet")
        assert isinstance(self.connection, ssl.SSLSocket)
        user, groups = peer_identity(self.connection.getpeercert() or {})
        if not self.server.authorize(user, groups):
            return self._error(403, f"Forbidden (user={user}, verb=get, resource=nodes, subresource=proxy)")
        namespace, pod, container = (urllib.parse.unquote(part) for part in match.groups())
        try:
            query = parse_query(url.query)
            path = self.server.source.log_file(namespace, pod, container, query.previous)
        except BadQuery as err:
            return self._error(400, str(err))
        except LogError as err:
            return self._error(err.status, err.message)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Connection", "close")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, socket.timeout, ssl.SSLError):
            stream_log(
                path,
                query,
                self._write,
                lambda: self.server.source.still_running(namespace, pod, container),
                self.server.stopping,
            )

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
