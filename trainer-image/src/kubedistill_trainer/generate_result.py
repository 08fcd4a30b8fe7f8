"""The StageResult of a generate attempt (generate.py): figures over all attempts, and the reason
when it stopped short."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubedistill.api.models import Artifacts, Metrics
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill.catalog import ResolvedTeacher
from kubedistill.domain import pricing
from kubedistill.traffic import traffic_summary
from kubedistill_trainer.prompts import Prepared
from kubedistill_trainer.teacher import TeacherError, Usage


@dataclass
class Outcome:
    usage: Usage = field(default_factory=Usage)
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    budget_stopped: bool = False
    fatal: TeacherError | None = None
    interrupted: bool = False
    seconds: float = 0.0
    retries: dict[str, int] = field(default_factory=dict)
    responses_without_usage: int = 0
    batch_details: dict[str, Any] = field(default_factory=dict)
    # Latency p50/p95 and llama.cpp's timings of this attempt's requests (speed.speed_figures).
    speed: dict[str, Any] = field(default_factory=dict)


def stage_result(
    inv: StageInvocation,
    teacher: ResolvedTeacher,
    prepared: Prepared,
    previous: Usage,
    outcome: Outcome,
    mode: str,
    index: int | None,
) -> StageResult:
    spec = inv.spec
    stage_uri = inv.stage_uri()
    total, base_done, shards = prepared.total, prepared.done, inv.parts()
    limit = spec.budget.max_teacher_cost_usd
    usage = Usage()
    usage.add(previous)
    usage.add(outcome.usage)
    answered = base_done + outcome.answered
    saving = max(0.0, pricing.sync_price(teacher, usage.input_tokens, usage.output_tokens) - usage.cost_usd)
    metrics = Metrics(
        teacher_calls=usage.calls,
        teacher_input_tokens=usage.input_tokens,
        teacher_output_tokens=usage.output_tokens,
        teacher_cost_total=usage.cost_usd,
        # Left out when nothing was cached or saved: most teachers offer neither.
        teacher_cached_input_tokens=usage.cached_input_tokens or None,
        teacher_saving_usd=saving or None,
        candidates=answered * spec.generation.n_samples,
        teacher_latency_p50_sec=outcome.speed.get("teacherLatencyP50Sec"),
        teacher_latency_p95_sec=outcome.speed.get("teacherLatencyP95Sec"),
        teacher_prompt_tokens_per_second=outcome.speed.get("teacherPromptTokensPerSecond"),
        teacher_decode_tokens_per_second=outcome.speed.get("teacherDecodeTokensPerSecond"),
    )
    artifacts = Artifacts(dataset_uri=f"{stage_uri}/dataset/", candidates_uri=f"{stage_uri}/candidates/")
    details = {
        "teacher": teacher.id,
        "teacherMode": mode,
        **outcome.batch_details,
        "priceNote": teacher.note,
        "prompts": total,
        **({"shard": index, "shards": shards} if index is not None else {}),
        "answered": answered,
        "answeredThisAttempt": outcome.answered,
        "trainRows": prepared.train,
        "testRows": prepared.test,
        "rejectedRows": prepared.rejected,
        **({"traffic": prepared.traffic.to_k8s()} if prepared.traffic is not None else {}),
        "failedPrompts": outcome.failed[:20],
        "retries": outcome.retries,
        "responsesWithoutUsage": outcome.responses_without_usage,
        "generationSeconds": round(outcome.seconds, 3),
        "requestsPerSecond": round(outcome.usage.calls / outcome.seconds, 2) if outcome.seconds else None,
        **outcome.speed,
    }
    rejected_note = f"; {prepared.rejected} invalid dataset rows skipped" if prepared.rejected else ""
    if prepared.traffic is not None:
        rejected_note += "; " + traffic_summary(prepared.traffic)
    result = StageResult(stage=inv.stage, ok=True, metrics=metrics, artifacts=artifacts, details=details)
    if outcome.fatal is not None:
        return result.model_copy(
            update={
                "ok": False,
                "reason": outcome.fatal.reason,
                "message": f"{outcome.fatal}; {answered}/{total} prompts answered and kept",
            }
        )
    if outcome.interrupted:
        return result.model_copy(
            update={
                "ok": False,
                "reason": "Interrupted",
                "message": f"stopped by a signal: {answered}/{total} prompts answered and kept; "
                + (
                    "a rerun polls the batches already submitted"
                    if mode == "batch"
                    else "a rerun asks only the missing ones"
                ),
            }
        )
    if outcome.budget_stopped:
        share = f" (this shard's 1/{shards} share of ${limit:.4f})" if shards > 1 and limit else ""
        limit = limit / shards if limit else limit
        return result.model_copy(
            update={
                "ok": False,
                "reason": "BudgetExceeded",
                "message": f"teacher budget ${limit:.4f}{share} reached (${usage.cost_usd:.4f} spent): {answered}/{total} "
                "prompts answered and kept; raise budget.maxTeacherCostUSD and rerun to continue",
            }
        )
    if outcome.failed:
        return result.model_copy(
            update={
                "ok": False,
                "reason": "TeacherUnavailable",
                "message": f"{len(outcome.failed)} prompts failed after retries; {answered}/{total} answered and "
                "kept; a rerun asks only the missing ones",
            }
        )
    if outcome.responses_without_usage:
        rejected_note += (
            f"; {outcome.responses_without_usage} responses had no usage: their cost is not counted"
        )
    if outcome.batch_details.get("unknownResults"):
        rejected_note += (
            f"; {outcome.batch_details['unknownResults']} batch results for unknown requests ignored"
        )
    saved = f", ${saving:.4f} saved against sync prices" if saving > 0 else ""
    message = (
        f"{answered} prompts × {spec.generation.n_samples} samples, ${usage.cost_usd:.4f} "
        f"({mode}{saved}){rejected_note}"
    )
    return result.model_copy(update={"message": message})
