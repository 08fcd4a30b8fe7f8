"""The candidate shards of generate: one row per answered prompt, written in numbered shards as answers
arrive, and read back by a rerun (what it need not ask again), curate and evaluate.

A shard is written whole (`store` writes are atomic), every `SHARD_ROWS` rows or `SHARD_SECONDS`
seconds, so a SIGKILL loses at most that much answered-but-unwritten work and never half a shard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubedistill import dataset, store
from kubedistill_trainer.teacher import Usage

SHARD_ROWS = 100
# A SIGKILL loses at most this much of answered-but-unwritten work (SIGTERM loses none).
SHARD_SECONDS = 1.0
SHARD_PREFIX = "candidates/shard-"


@dataclass
class Work:
    row: dataset.Row
    split: str


def candidate_row(
    work: Work, texts: list[str], finish: list[str], usage: Usage, model: str
) -> dict[str, Any]:
    return {
        **work.row.to_json(),
        "split": work.split,
        "candidates": texts,
        "finishReasons": finish,
        "usage": {
            "calls": usage.calls,
            "inputTokens": usage.input_tokens,
            "outputTokens": usage.output_tokens,
            "cachedInputTokens": usage.cached_input_tokens,
        },
        "costUSD": usage.cost_usd,
        "model": model,
    }


def usage_of(row: dict[str, Any]) -> Usage:
    u = row.get("usage", {})
    return Usage(
        u.get("calls", 0),
        u.get("inputTokens", 0),
        u.get("outputTokens", 0),
        row.get("costUSD", 0.0),
        u.get("cachedInputTokens", 0),
    )


def shard_index(uri: str, prefix: str = SHARD_PREFIX) -> int:
    return int(uri.rsplit(prefix, 1)[1].split(".", 1)[0])


def shard_uris(stage_uri: str, prefix: str) -> list[str]:
    directory = prefix.rsplit("/", 1)[0]
    return [u for u in store.list_uris(f"{stage_uri}/{directory}/") if prefix in u and u.endswith(".jsonl")]


def next_shard_index(uris: Sequence[str], prefix: str) -> int:
    return max((shard_index(u, prefix) for u in uris), default=-1) + 1


def read_shards(stage_uri: str, prefix: str) -> tuple[list[dict[str, Any]], int]:
    """Every row of `<stage_uri>/<prefix>NNNNN.jsonl` in shard order, and the next shard index."""
    uris = shard_uris(stage_uri, prefix)
    return [row for uri in uris for row in store.read_jsonl(uri)], next_shard_index(uris, prefix)


def answered_so_far(stage_uri: str) -> tuple[dataset.SeenIds, Usage, int]:
    """Ids already answered, what they cost and the next shard index — one line in memory at a
    time and no answer texts kept, so resuming a large job stays small."""
    uris = shard_uris(stage_uri, SHARD_PREFIX)
    ids = dataset.SeenIds()
    usage = Usage()
    for uri in uris:
        for row in store.iter_jsonl(uri):
            if ids.add(row["id"]):
                usage.add(usage_of(row))
    return ids, usage, next_shard_index(uris, SHARD_PREFIX)


class ShardWriter:
    """Buffers answered rows and writes them as a new shard every `rows` rows or `seconds` seconds."""

    def __init__(
        self,
        stage_uri: str,
        next_index: int,
        *,
        prefix: str = SHARD_PREFIX,
        rows: int = SHARD_ROWS,
        seconds: float = SHARD_SECONDS,
    ) -> None:
        self.stage_uri = stage_uri
        self.prefix = prefix
        self.index = next_index
        self.max_rows = rows
        self.max_seconds = seconds
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.written = 0

    def due(self) -> bool:
        return len(self.buffer) >= self.max_rows or (
            bool(self.buffer) and time.monotonic() - self.last_flush >= self.max_seconds
        )

    async def flush(self) -> None:
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        uri = f"{self.stage_uri}/{self.prefix}{self.index:05d}.jsonl"
        self.index += 1
        self.last_flush = time.monotonic()
        await asyncio.to_thread(store.write_jsonl, uri, rows)
        self.written += len(rows)
