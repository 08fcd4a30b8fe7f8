"""ModelAlias, pure: resolve a target into concrete URIs, and keep the replaced serving states for rollback."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from kubedistill.api.alias import (
    AliasHistoryEntry,
    AliasTarget,
    CanaryTarget,
    ModelAlias,
    ModelAliasSpec,
    ModelAliasStatus,
)
from kubedistill.api.models import GROUP, DistillationJob, Phase
from kubedistill.domain import conditions as cond
from kubedistill.domain.conditions import Reason, rfc3339

MAX_HISTORY = 10
RESOLVED_TARGET_ANNOTATION = f"{GROUP}/resolved-target"
# The job's stages are done once it is Promoting: the alias may resolve before the job says Succeeded.
RESOLVABLE = (Phase.PROMOTING, Phase.SUCCEEDED)


def resolve(alias: ModelAlias, job: DistillationJob | None, now: datetime) -> ModelAliasStatus:
    """The alias status for this target (and, for a job target, that job as it is now)."""
    status = (alias.status or ModelAliasStatus()).model_copy(deep=True)
    status.observed_generation = alias.metadata.generation
    target = alias.spec.target
    gguf, adapter, model = target.gguf_uri, target.adapter_uri, target.base_model
    ready, reason, message = True, Reason.TARGET_RESOLVED, "explicit target"
    if target.provider is not None:
        model, message = target.provider.model, f"provider model {target.provider.model}"
    if target.distillation_job is not None:
        gguf = adapter = model = None
        if job is None:
            ready, reason = False, Reason.JOB_NOT_FOUND
            message = f"DistillationJob {target.distillation_job} not found"
        elif (job.status.phase if job.status else None) not in RESOLVABLE:
            phase = job.status.phase.value if job.status and job.status.phase else "Pending"
            ready, reason = False, Reason.JOB_NOT_SUCCEEDED
            message = f"DistillationJob {target.distillation_job} is {phase}"
        else:
            artifacts = job.status.artifacts if job.status else None
            gguf = (artifacts.gguf_uris or {}).get(target.quantization) if artifacts else None
            adapter = artifacts.adapter_uri if artifacts else None
            model = job.spec.student.model
            if gguf is None and adapter is None:
                ready, reason = False, Reason.ARTIFACT_MISSING
                message = (
                    f"DistillationJob {target.distillation_job} has no {target.quantization} GGUF or adapter"
                )
            else:
                message = f"DistillationJob {target.distillation_job} ({target.quantization})"
    status.gguf_uri, status.adapter_uri, status.model = gguf, adapter, model
    status.conditions = cond.set_condition(
        status.conditions,
        cond.READY,
        "True" if ready else "False",
        reason,
        message,
        now=now,
        generation=alias.metadata.generation,
    )
    return status


def serving_state(spec: ModelAliasSpec) -> AliasHistoryEntry:
    """What a rollback restores: the primary target and the canary beside it (fallback and server settings
    are not versions of the model, and stay)."""
    return AliasHistoryEntry(target=spec.target, canary=spec.canary)


def state_annotation(state: AliasHistoryEntry) -> str:
    data = {"target": state.target.to_k8s(), **({"canary": state.canary.to_k8s()} if state.canary else {})}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def recorded_state(annotation: str, current: AliasHistoryEntry) -> AliasHistoryEntry:
    """The state an annotation recorded. Operators before canaries recorded the bare target: its canary
    is taken as unchanged, since nothing says otherwise."""
    data = json.loads(annotation)
    if "target" not in data:
        return AliasHistoryEntry(target=AliasTarget.model_validate(data), canary=current.canary)
    canary = data.get("canary")
    return AliasHistoryEntry(
        target=AliasTarget.model_validate(data["target"]),
        canary=CanaryTarget.model_validate(canary) if canary else None,
    )


def remember(status: ModelAliasStatus, previous: AliasHistoryEntry, now: datetime) -> ModelAliasStatus:
    """Put the replaced serving state first in history (newest first, at most 10), once."""
    if status.history and (status.history[0].target, status.history[0].canary) == (
        previous.target,
        previous.canary,
    ):
        return status
    entry = previous.model_copy(update={"replaced_at": rfc3339(now)})
    return status.model_copy(update={"history": [entry, *status.history][:MAX_HISTORY]})


def promoted_job(alias_spec: dict[str, Any], as_canary: bool) -> str | None:
    """The job the alias's promoted slot names: the canary's for a canary promotion (once the alias has a
    canary: a new alias gets the student as its primary), else the primary's."""
    slot = "canary" if as_canary and "canary" in alias_spec else "target"
    job: str | None = (alias_spec.get(slot) or {}).get("distillationJob")
    return job
