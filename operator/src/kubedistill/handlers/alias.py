"""ModelAlias reconcile: read the alias and the job it names, resolve (pure, `domain.alias`), patch."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubedistill.api.alias import AliasTarget, ModelAlias, ModelAliasStatus
from kubedistill.api.models import DistillationJob
from kubedistill.domain.alias import RESOLVED_TARGET_ANNOTATION, remember, resolve, target_annotation
from kubedistill.k8s import resources
from kubedistill.k8s.client import Kube


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
