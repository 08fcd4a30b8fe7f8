"""ModelAlias: resolve the target into concrete URIs; keep the last targets for rollback."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from kubedistill.api.models import (
    GROUP,
    AliasHistoryEntry,
    AliasTarget,
    DistillationJob,
    ModelAlias,
    ModelAliasStatus,
    Phase,
)
from kubedistill.domain import conditions as cond
from kubedistill.domain.conditions import Reason, rfc3339
from kubedistill.k8s import resources
from kubedistill.k8s.client import Kube

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


def remember(status: ModelAliasStatus, previous: AliasTarget, now: datetime) -> ModelAliasStatus:
    """Put the replaced target first in history (newest first, at most 10), once."""
    if status.history and status.history[0].target == previous:
        return status
    entry = AliasHistoryEntry(target=previous, replaced_at=rfc3339(now))
    return status.model_copy(update={"history": [entry, *status.history][:MAX_HISTORY]})


def target_annotation(target: AliasTarget) -> str:
    return json.dumps(target.to_k8s(), sort_keys=True, separators=(",", ":"))


async def reconcile_alias(kube: Kube, body: dict[str, Any], now: datetime) -> ModelAliasStatus:
    """Resolve the target; when it changed since the last resolution, remember the previous one.

    The last resolved target is kept in an annotation, so a change is noticed even if the operator
    was down when it happened (a diff of watch events would miss it).
    """
    alias = ModelAlias.model_validate(body)
    namespace = alias.metadata.namespace or "default"
    job = None
    if alias.spec.target.distillation_job is not None:
        found = await resources.get_distillation_job(kube, namespace, alias.spec.target.distillation_job)
        job = DistillationJob.model_validate(found) if found is not None else None
    status = resolve(alias, job, now)
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    current = target_annotation(alias.spec.target)
    recorded = annotations.get(RESOLVED_TARGET_ANNOTATION)
    if recorded is not None and recorded != current:
        status = remember(status, AliasTarget.model_validate_json(recorded), now)
    new = status.to_k8s()
    if new != (alias.status or ModelAliasStatus()).to_k8s():
        await resources.patch_alias_status(kube, namespace, alias.metadata.name, new)
    if recorded != current:
        await resources.annotate_alias(
            kube, namespace, alias.metadata.name, {RESOLVED_TARGET_ANNOTATION: current}
        )
    return status
