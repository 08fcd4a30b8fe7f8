"""The candidate shards of generate: one row per answered prompt, written in numbered shards as answers
arrive, and read back by a rerun (what it need not ask again), curate and evaluate.

A shard is written whole (`store` writes are atomic), every `SHARD_ROWS` rows or `SHARD_SECONDS`
seconds, so a SIGKILL loses at most that much answered-but-unwritten work and never half a shard.

With `generation.shards` > 1, generation pod k writes its shards below `candidates/part-KKKK/`, so
the pods never write the same file and a rerun of one pod finds what it answered before; readers
take every `shard-*.jsonl` below `candidates/`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
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


def part_prefix(index: int | None) -> str:
    """The candidate shard prefix of generation pod `index` (None: the stage is not sharded)."""
    return SHARD_PREFIX if index is None else f"candidates/part-{index:04d}/shard-"


def candidate_uris(stage_uri: str) -> list[str]:
    """Every candidate shard of every generation pod, in a stable order."""
    return [
        u
        for u in store.list_uris(f"{stage_uri}/candidates/")
        if u.rsplit("/", 1)[1].startswith("shard-") and u.endswith(".jsonl")
    ]


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


def answered_so_far(
    stage_uri: str, prefix: str = SHARD_PREFIX, owns: Callable[[str], bool] | None = None
) -> tuple[dataset.SeenIds, Usage, int]:
    """Ids already answered that this pod `owns` (all by default), what they cost and the next index
    of `prefix`'s shards — one line in memory at a time and no answer texts kept, so resuming a
    large job stays small. Every pod's shards are read: what counts is who owns a row now."""
    ids = dataset.SeenIds()
    usage = Usage()
    for uri in candidate_uris(stage_uri):
        for row in store.iter_jsonl(uri):
            if (owns is None or owns(row["id"])) and ids.add(row["id"]):
                usage.add(usage_of(row))
    return ids, usage, next_shard_index(shard_uris(stage_uri, prefix), prefix)


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
