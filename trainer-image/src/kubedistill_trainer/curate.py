"""curate: judge every teacher candidate, keep the best `topK` per prompt as chosen, the rest as rejected.

Reads the generate stage's candidate shards; writes below `<artifactBase>/curate/`:
- `curated/train.jsonl` — train-split prompts that kept at least one passing candidate:
  `{id, split, prompt|messages, system?, reference?, chosen: [text...], rejected: [text...],
  scores: [score or null per candidate, in candidate order], chosenScores: [...]}`; chosen is best
  first. Train reads it (chosen = y⁺, rejected = y⁻).
- `curated/test.jsonl` — the same for held-out prompts: evaluate takes `chosen[0]` as the teacher's
  best answer.
- `scores/shard-NNNNN.jsonl` (llm judge only) — `{id, index, score, reason}` as they arrive, so a
  rerun does not pay the judge twice; SIGTERM/SIGINT lets the calls in flight finish and be written,
  then fails the stage with Interrupted.

A candidate passes when its score is > 0; a prompt whose candidates all fail (or are unparsable)
is dropped. `details.histogram` counts scores in ten bins over [0, 1] plus `unparsable`.

Memory stays bounded whatever the number of prompts: the shards (and the cached scores) are first
partitioned by a hash of the prompt id into bucket files on local disk (/tmp, about the size of the
candidates), then each bucket is judged and curated on its own, holding ~`BUCKET_ROWS` prompts. A
prompt's rows (a retried prompt may appear in two shards; the first wins) always share a bucket.
Curated rows are written to local files as they are decided and uploaded once at the end, so the
output comes in bucket order, not shard order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import signal
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kubedistill import store
from kubedistill.api.models import Artifacts, JudgeSpec, Metrics, Stage
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill_trainer import generate, shards
from kubedistill_trainer.judges import JudgeItem, Score, judge_client, score
from kubedistill_trainer.runtime import ProgressReporter, StageFailure, run_async
from kubedistill_trainer.teacher import TeacherAborted, TeacherAuthFailed, TeacherClient, TeacherRejected

log = logging.getLogger(__name__)

SCORE_PREFIX = "scores/shard-"
BINS = 10
# Prompts held in memory at once: with nSamples 4 and ~1 KB answers, ~10 MB of rows and scores.
BUCKET_ROWS = 2000
# Bucket files open at once while partitioning (well under a pod's open-file limit).
MAX_BUCKETS = 512
SPLITS = ("train", "test")


def prompt_text(row: dict[str, Any]) -> str:
    """What an LLM judge is shown as the question: the prompt, or the whole conversation so far."""
    if "messages" not in row:
        return str(row.get("prompt", ""))
    turns = [m for m in row["messages"] if m["role"] != "system"]
    if len(turns) == 1:
        return str(turns[0]["content"])
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in turns)


def items_of(row: dict[str, Any]) -> list[JudgeItem]:
    candidates = row["candidates"]
    return [
        JudgeItem(prompt=prompt_text(row), answer=c, reference=row.get("reference"), peers=candidates)
        for c in candidates
    ]


def select(scores: Sequence[Score], top_k: int) -> tuple[list[int], list[int]]:
    """Indices of chosen (best first, passing only, at most top_k) and rejected (all the others)."""
    order = sorted(range(len(scores)), key=lambda i: (-(scores[i].value or 0.0), i))
    chosen = [i for i in order if scores[i].passed][:top_k]
    return chosen, [i for i in range(len(scores)) if i not in chosen]


@dataclass
class Histogram:
    """Scores in ten bins over [0, 1] plus `unparsable`, and their mean, added bucket by bucket."""

    bins: list[int] = field(default_factory=lambda: [0] * BINS)
    unparsable: int = 0
    total: float = 0.0
    count: int = 0

    def add(self, scores: Sequence[Score]) -> None:
        for s in scores:
            self.count += 1
            if s.value is None:
                self.unparsable += 1
            else:
                self.bins[min(BINS - 1, int(s.value * BINS))] += 1
                self.total += s.value

    def as_dict(self) -> dict[str, int]:
        labels = [f"{b / BINS:.1f}-{(b + 1) / BINS:.1f}" for b in range(BINS)]
        return {**dict(zip(labels, self.bins, strict=True)), "unparsable": self.unparsable}

    @property
    def mean(self) -> float:
        return round(self.total / max(1, self.count), 4)


def histogram(scores: Sequence[Score]) -> dict[str, int]:
    found = Histogram()
    found.add(scores)
    return found.as_dict()


def curated_row(row: dict[str, Any], scores: Sequence[Score], top_k: int) -> dict[str, Any] | None:
    chosen, rejected = select(scores, top_k)
    if not chosen:
        return None
    keep: dict[str, Any] = {
        k: row[k] for k in ("id", "split", "prompt", "messages", "system", "reference") if k in row
    }
    candidates = row["candidates"]
    chosen_texts = [candidates[i] for i in chosen]
    return {
        **keep,
        "chosen": chosen_texts,
        # A rejected answer identical to a chosen one makes a preference pair with no signal
        # (its log-ratio difference is 0 by construction) that still costs two forward passes.
        "rejected": [candidates[i] for i in rejected if candidates[i] not in chosen_texts],
        "scores": [s.value for s in scores],
        "chosenScores": [scores[i].value for i in chosen],
    }


def bucket_of(row_id: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest(), "big") % buckets


@dataclass
class Partition:
    """Candidate rows and cached scores, split by prompt id into bucket files under `directory`."""

    directory: Path
    buckets: int
    candidates: int = 0
    next_score_shard: int = 0

    def rows_path(self, bucket: int) -> Path:
        return self.directory / f"rows-{bucket:04d}.jsonl"

    def scores_path(self, bucket: int) -> Path:
        return self.directory / f"scores-{bucket:04d}.jsonl"


def _split_lines(uris: Sequence[str], paths: Sequence[Path], buckets: int) -> Iterator[dict[str, Any]]:
    """Append each line of the objects at `uris` to the bucket file of its id; yields each parsed row."""
    with contextlib.ExitStack() as stack:
        files: list[IO[bytes]] = [stack.enter_context(p.open("ab")) for p in paths]
        for uri in uris:
            for line in store.iter_lines(uri):
                if not line.strip():
                    continue
                row = json.loads(line)
                files[bucket_of(str(row["id"]), buckets)].write(line + b"\n")
                yield row


def partition(inv: StageInvocation, directory: Path, *, with_scores: bool) -> Partition:
    candidate_uris = shards.candidate_uris(inv.stage_uri(Stage.GENERATE))
    # Shards hold at most SHARD_ROWS prompts: enough buckets for BUCKET_ROWS each at the most.
    buckets = max(1, min(MAX_BUCKETS, math.ceil(len(candidate_uris) * shards.SHARD_ROWS / BUCKET_ROWS)))
    part = Partition(directory, buckets)
    paths = [part.rows_path(b) for b in range(buckets)]
    for row in _split_lines(candidate_uris, paths, buckets):
        part.candidates += len(row["candidates"])
    if with_scores:
        score_uris = shards.shard_uris(inv.stage_uri(), SCORE_PREFIX)
        for _ in _split_lines(score_uris, [part.scores_path(b) for b in range(buckets)], buckets):
            pass
        part.next_score_shard = shards.next_shard_index(score_uris, SCORE_PREFIX)
    return part


def load_bucket(part: Partition, bucket: int) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Score]]:
    """The bucket's candidate rows (first occurrence of an id wins) and its cached llm scores."""
    unique: dict[str, dict[str, Any]] = {}
    path = part.rows_path(bucket)
    if path.is_file():
        with path.open("rb") as f:
            for line in f:
                row = json.loads(line)
                unique.setdefault(row["id"], row)
    cached: dict[tuple[str, int], Score] = {}
    scores = part.scores_path(bucket)
    if scores.is_file():
        with scores.open("rb") as f:
            for line in f:
                r = json.loads(line)
                cached[(r["id"], r["index"])] = Score(r["score"], r.get("reason", ""))
    return list(unique.values()), cached


async def score_llm_resumable(
    judge: JudgeSpec,
    rows: Sequence[dict[str, Any]],
    client: TeacherClient,
    cached: dict[tuple[str, int], Score],
    writer: shards.ShardWriter,
    meter: Meter,
    stop: asyncio.Event,
) -> dict[tuple[str, int], Score]:
    """LLM scores for every candidate of `rows`, reusing `cached` (the score shards of earlier attempts).

    Scores are written in shards as they arrive; once `stop` is set, the calls in flight finish and
    are written, and no new one starts (the result then lacks the unscored candidates).
    """
    scores = dict(cached)
    meter.done += len(scores)
    missing = iter(
        [
            (row["id"], i, item)
            for row in rows
            for i, item in enumerate(items_of(row))
            if (row["id"], i) not in scores
        ]
    )

    async def worker() -> None:
        for row_id, index, item in missing:
            if stop.is_set():
                return
            try:
                (result,) = await score(judge, [item], client=client)
            except TeacherAborted:
                return
            except (TeacherAuthFailed, TeacherRejected):
                client.abort()  # the judge refuses every request alike: send no more
                raise
            scores[(row_id, index)] = result
            meter.done += 1
            if not result.final:
                continue  # not cached: the next attempt asks the judge again
            writer.buffer.append(
                {"id": row_id, "index": index, "score": result.value, "reason": result.reason}
            )
            if writer.due():
                await writer.flush()
            meter.report(client.usage.cost_usd)

    async def abort_on_stop() -> None:
        await stop.wait()
        client.abort()

    watcher = asyncio.create_task(abort_on_stop())
    try:
        await asyncio.gather(*(worker() for _ in range(generate.WORKERS_PER_SLOT * client.max_concurrency)))
    finally:
        watcher.cancel()
        await writer.flush()
    return scores


@dataclass
class Meter:
    """Candidates judged so far, over all buckets, written to progress.json."""

    progress: ProgressReporter
    total: int
    done: int = 0

    def report(self, cost_usd: float = 0.0, force: bool = False) -> None:
        self.progress.update(
            self.done,
            self.total,
            detail=f"{self.done}/{self.total} candidates judged",
            cost_usd=cost_usd,
            force=force,
        )


@dataclass
class Curated:
    """What the buckets added up to."""

    prompts: int = 0
    dropped: int = 0
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    chosen: int = 0
    unjudged: list[Score] = field(default_factory=list)
    histogram: Histogram = field(default_factory=Histogram)
    judge_usage: dict[str, Any] = field(default_factory=dict)


def curate_rows(
    rows: Sequence[dict[str, Any]], scores: dict[tuple[str, int], Score], top_k: int, tally: Curated
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(split, curated row) for each prompt that keeps a candidate; `tally` counts all of them."""
    for row in rows:
        row_scores = [scores[(row["id"], i)] for i in range(len(row["candidates"]))]
        tally.prompts += 1
        tally.histogram.add(row_scores)
        kept = curated_row(row, row_scores, top_k)
        if kept is None:
            tally.dropped += 1
            continue
        split = row.get("split", "train")
        tally.kept[split] += 1
        if split == "train":
            tally.chosen += len(kept["chosen"])
        yield split, kept


async def curate_buckets(
    inv: StageInvocation, part: Partition, outputs: Mapping[str, IO[bytes]], meter: Meter
) -> Curated:
    """Judge and curate bucket by bucket, writing each curated row to `outputs[split]` as it is decided."""
    judge = inv.spec.curation.judge
    tally = Curated()
    async with judge_client(inv.spec, judge) as client:
        stop = asyncio.Event()
        if client is not None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                # As in generate: finish and keep the paid judge calls in flight, then stop.
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.add_signal_handler(sig, stop.set)
        writer = shards.ShardWriter(inv.stage_uri(), part.next_score_shard, prefix=SCORE_PREFIX)
        for bucket in range(part.buckets):
            rows, cached = load_bucket(part, bucket)
            if client is not None:
                try:
                    scores = await score_llm_resumable(judge, rows, client, cached, writer, meter, stop)
                finally:
                    await writer.flush()
                if stop.is_set():
                    raise StageFailure(
                        "Interrupted",
                        f"stopped by a signal after {meter.done} judged candidates (kept); "
                        "a rerun judges only the rest",
                    )
                tally.unjudged += [s for s in scores.values() if not s.final]
            else:
                scores = {}
                for row in rows:
                    for i, s in enumerate(await score(judge, items_of(row))):
                        scores[(row["id"], i)] = s
                meter.done += sum(len(r["candidates"]) for r in rows)
                meter.report()
            if tally.unjudged:
                continue  # the stage fails below: judge the rest (and keep their scores) first
            for split, kept in curate_rows(rows, scores, inv.spec.curation.top_k, tally):
                outputs[split].write(
                    json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                )
        if tally.unjudged:
            raise StageFailure(
                "TeacherUnavailable",
                f"{len(tally.unjudged)} of {meter.done} candidates could not be judged "
                f"({tally.unjudged[0].reason}); the others are kept and a rerun judges only these",
            )
        if client is not None:
            usage = client.usage
            tally.judge_usage = {
                "judgeCalls": usage.calls,
                "judgeInputTokens": usage.input_tokens,
                "judgeOutputTokens": usage.output_tokens,
                "judgeCostUSD": usage.cost_usd,
            }
    return tally


def run(inv: StageInvocation) -> StageResult:
    stage_uri = inv.stage_uri()
    progress = ProgressReporter(stage_uri, inv.stage)
    with tempfile.TemporaryDirectory(prefix="curate-") as tmp:
        directory = Path(tmp)
        part = partition(inv, directory, with_scores=inv.spec.curation.judge.llm is not None)
        if not part.candidates:
            raise StageFailure("NoCandidates", "the generate stage left no candidates to curate")
        meter = Meter(progress, part.candidates)
        progress.update(0, part.candidates, detail="judging candidates", force=True)
        paths = {split: directory / f"curated-{split}.jsonl" for split in SPLITS}
        with contextlib.ExitStack() as stack:
            outputs = {split: stack.enter_context(path.open("wb")) for split, path in paths.items()}
            tally = run_async(curate_buckets(inv, part, outputs, meter))
        for split, path in paths.items():
            store.put_file(path, f"{stage_uri}/curated/{split}.jsonl")
    meter.done = meter.total
    meter.report(tally.judge_usage.get("judgeCostUSD", 0.0), force=True)

    hist = tally.histogram.as_dict()
    details = {
        "judge": inv.spec.curation.judge.kind,
        "histogram": hist,
        "unparsable": hist["unparsable"],
        "prompts": tally.prompts,
        "droppedPrompts": tally.dropped,
        "trainPrompts": tally.kept["train"],
        "testPrompts": tally.kept["test"],
        "meanScore": tally.histogram.mean,
        "buckets": part.buckets,
        **tally.judge_usage,
    }
    result = StageResult(
        stage=inv.stage,
        ok=True,
        message=f"{tally.chosen} chosen candidates for {tally.kept['train']} train prompts; "
        f"{tally.dropped} prompts dropped"
        + (f"; {hist['unparsable']} judge replies unparsable" if hist["unparsable"] else ""),
        metrics=Metrics(curated=tally.chosen),
        artifacts=Artifacts(curated_uri=f"{stage_uri}/curated/"),
        details=details,
    )
    if not tally.kept["train"]:
        return result.model_copy(
            update={
                "ok": False,
                "reason": "NothingCurated",
                "message": f"no train prompt kept a passing candidate ({tally.dropped} of {tally.prompts} "
                f"dropped, {hist['unparsable']} unparsable judge replies): nothing to train on",
            }
        )
    return result
