"""One stage's result and progress from its parts: the pods of a sharded generate (an Indexed Job)
each write their own result.json and progress.json (api/stage.py `part_uri`); the status shows the
sums, so cost and progress are those of the whole stage, each part counted once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubedistill.api.models import Metrics, Stage
from kubedistill.api.stage import StageProgress, StageResult

# Metrics that add up across parts; the latency figures are per request, so the slowest part's stand.
_SUMMED = (
    "teacher_calls",
    "teacher_input_tokens",
    "teacher_output_tokens",
    "teacher_cost_total",
    "teacher_cached_input_tokens",
    "teacher_saving_usd",
    "candidates",
)
_WORST = ("teacher_latency_p50_sec", "teacher_latency_p95_sec")
_DETAILS_SUMMED = ("prompts", "answered", "answeredThisAttempt")


def _sum(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def merge_metrics(metrics: Sequence[Metrics]) -> Metrics:
    merged: dict[str, Any] = {name: _sum([getattr(m, name) for m in metrics]) for name in _SUMMED}
    for name in _WORST:
        present = [getattr(m, name) for m in metrics if getattr(m, name) is not None]
        merged[name] = max(present) if present else None
    return Metrics(**merged)


def merge_results(parts: Sequence[StageResult | None], stage: Stage = Stage.GENERATE) -> StageResult:
    """The stage's result from its parts' (None: a part that wrote none). It succeeded only if every part did."""
    found = [p for p in parts if p is not None]
    failed = [(i, p) for i, p in enumerate(parts) if p is None or not p.ok]
    metrics = merge_metrics([p.metrics for p in found])
    details: dict[str, Any] = {k: sum(p.details.get(k, 0) for p in found) for k in _DETAILS_SUMMED}
    details["shards"] = len(parts)
    artifacts = found[0].artifacts if found else None
    if not failed:
        cost = metrics.teacher_cost_total or 0.0
        ok_message = (
            f"{len(parts)} shards: {details['answered']}/{details['prompts']} prompts answered, ${cost:.4f}"
        )
        return StageResult(
            stage=stage,
            ok=True,
            message=ok_message,
            metrics=metrics,
            details=details,
            **({"artifacts": artifacts} if artifacts else {}),
        )
    index, first = failed[0]
    reason = first.reason if first is not None else "ShardMissing"
    said = first.message if first is not None else "it wrote no result"
    return StageResult(
        stage=stage,
        ok=False,
        reason=reason,
        message=f"{len(failed)} of {len(parts)} shards failed; shard {index}: {said}",
        metrics=metrics,
        details=details,
        **({"artifacts": artifacts} if artifacts else {}),
    )


def merge_progress(parts: Sequence[StageProgress]) -> StageProgress | None:
    """Done, total and cost summed over the parts that reported; the ETA is the slowest part's."""
    if not parts:
        return None
    done, total = sum(p.done for p in parts), sum(p.total for p in parts)
    etas = [p.eta_seconds for p in parts if p.eta_seconds is not None]
    return StageProgress(
        stage=parts[0].stage,
        done=done,
        total=total,
        detail=f"{done}/{total} prompts answered by {len(parts)} shards",
        cost_usd=sum(p.cost_usd for p in parts),
        eta_seconds=max(etas) if etas else None,
        updated_at=max((p.updated_at for p in parts if p.updated_at), default=None),
    )
