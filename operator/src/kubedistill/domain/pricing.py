"""How a job's teacher requests are billed: sync or batch, and what the provider's prompt cache saves.

Pure functions shared by the estimate (before anything runs) and the generate stage (while it runs):

    mode = teacher_mode("auto", teacher, requests=600)       # "batch" when the provider has a batch API
    prefix = None
    for row in rows: prefix = narrow_prefix(prefix, row.teacher_messages(...))
    cached = predicted_cached_tokens(prefix_tokens, requests=600, min_tokens=teacher.cache_min_tokens)

Providers cache a prompt prefix by themselves once it is long enough (`cacheMinTokens` in the
catalog): every request of a job repeats the teacher instruction and the few-shot turns, so all
requests but the first read that prefix from the cache. The prediction ignores the granularity some
providers cache in (OpenAI: 128-token steps) — at most one step per request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from kubedistill.catalog import ResolvedTeacher

# `auto` uses the batch API from this many teacher requests on: below it, the hours a batch may take
# are not worth the few cents it saves.
AUTO_BATCH_MIN_REQUESTS = 100

Mode = Literal["sync", "batch"]


class BatchUnsupported(ValueError):
    """teacher.mode batch for a teacher whose provider the catalog lists without a batch API."""

    reason = "BatchUnsupported"


def teacher_mode(requested: str, teacher: ResolvedTeacher, requests: int) -> Mode:
    """The mode a job runs in: `batch` must be possible, `auto` picks batch when it is and pays off."""
    if requested == "batch":
        if teacher.batch_api is None:
            raise BatchUnsupported(
                f"teacher.mode batch: the catalog lists no batch API for {teacher.id} "
                f"(provider {teacher.provider or 'unknown'}); use mode sync or auto, or set batchAPI for "
                "the provider in a catalog override"
            )
        return "batch"
    if requested == "auto" and teacher.batch_api is not None and requests >= AUTO_BATCH_MIN_REQUESTS:
        return "batch"
    return "sync"


def narrow_prefix(
    prefix: list[dict[str, str]] | None, messages: Sequence[Mapping[str, str]]
) -> list[dict[str, str]]:
    """The longest run of whole messages that `prefix` (None: no request seen yet) and this request
    both start with, never a request's last message (the prompt itself, which a cache cannot serve).
    Fed every request in turn, it keeps only the shared prefix in memory."""
    head = [dict(m) for m in messages[:-1]]
    if prefix is None:
        return head
    same = 0
    while same < min(len(prefix), len(head)) and prefix[same] == head[same]:
        same += 1
    return prefix[:same]


def predicted_cached_tokens(prefix_tokens: int, requests: int, min_tokens: int | None) -> int:
    """Cached input tokens over `requests` requests sharing a `prefix_tokens` prefix: the first request
    writes the cache, the others read it — when the provider caches a prefix that long at all."""
    if min_tokens is None or prefix_tokens < min_tokens or requests < 2:
        return 0
    return prefix_tokens * (requests - 1)


def sync_price(teacher: ResolvedTeacher, input_tokens: int, output_tokens: int) -> float:
    """What the same tokens cost synchronously without any cache: the baseline a saving is measured on."""
    return teacher.cost(input_tokens, output_tokens)
