"""Typed errors of the SDK and CLI, and pydantic errors written the way the API server writes them.

Local mode, `kubedistill apply` and `Distiller.create` all report a bad spec as lines of
`spec.curation.topK: <why>`: the path notation the API server uses (`spec.export.quantizations[1]`),
so a user sees the same field named wherever the job was refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

# A dotted camelCase field path inside a cross-field validator's words ("curation.topK must not ...").
_FIELD_IN_WORDS = re.compile(r"\b(?:spec\.)?([a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)+)\b")


class DistillerError(Exception):
    """An error from the API server (or the SDK itself), carrying the server's own message."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else type(self).status
        self.reason = reason


class NotFound(DistillerError):
    status = 404


class Invalid(DistillerError):
    status = 422


class Conflict(DistillerError):
    status = 409


class Forbidden(DistillerError):
    status = 403


class Unauthorized(DistillerError):
    status = 401


_BY_STATUS: dict[int, type[DistillerError]] = {
    400: Invalid,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: Invalid,
}


def from_status(status: int | None, body: str | bytes | None, fallback: str = "") -> DistillerError:
    """The typed error for an API server answer: its `Status` object's message when it sent one."""
    message, reason = fallback, None
    if body:
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            message = str(parsed.get("message") or fallback)
            reason = parsed.get("reason")
    cls = _BY_STATUS.get(status or 0, DistillerError)
    return cls(message or f"API server answered {status}", status=status, reason=reason)


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location in the API server's notation: spec.export.quantizations[1]."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def error_lines(err: ValidationError) -> list[str]:
    """One `path: message` line per error, for a whole DistillationJob/ModelAlias object.

    A rule across fields is raised by pydantic at the object that holds both (topK vs nSamples at
    `spec`); it is reported at the field its words name, as the API server's CEL rule does.
    """
    lines = []
    for e in err.errors():
        path = field_path(tuple(e["loc"]))
        message = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "value_error":
            named = _FIELD_IN_WORDS.search(message)
            if named and path:
                path = f"{path}.{named.group(1)}"
        lines.append(f"{path}: {message}" if path else message)
    return lines
