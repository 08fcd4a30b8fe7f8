"""Recording at reconcile time: the alias's plan with its credentials read, its condition, and the
gateway's share of it (rendering is pure: `domain.recording`, `builders.recording`)."""

from __future__ import annotations

from datetime import datetime

from kubedistill.api.alias import ModelAlias, ModelAliasStatus
from kubedistill.builders.stage_job import operator_root
from kubedistill.domain import conditions as cond
from kubedistill.domain.recording import (
    RECORDING,
    RecordingPlan,
    plan_recording,
    secret_not_found,
    without_gateway,
)
from kubedistill.k8s import serving as k8s
from kubedistill.k8s.client import Kube
from kubedistill.settings import Settings


async def recording_plan(
    kube: Kube, alias: ModelAlias, settings: Settings
) -> tuple[RecordingPlan | None, dict[str, str]]:
    """The alias's recording plan and the key values to copy into the gateway's keys Secret (env
    name → value; never logged). A credentials Secret that does not exist records nothing."""
    namespace = alias.metadata.namespace or "default"
    spec = alias.spec.recording
    if spec is not None and spec.enabled and not settings.gateway_enabled:
        return without_gateway(), {}
    plan = plan_recording(namespace, alias.metadata.name, spec, settings, operator_root(settings))
    values: dict[str, str] = {}
    for copy in plan.copies if plan is not None else ():
        value = await k8s.read_secret_value(kube, copy.namespace, copy.secret, copy.key)
        if value is None:
            assert plan is not None
            return secret_not_found(plan, copy.secret), {}
        values[copy.env] = value
    return plan, values


def with_recording_condition(
    status: ModelAliasStatus, alias: ModelAlias, plan: RecordingPlan | None, now: datetime
) -> ModelAliasStatus:
    generation = alias.metadata.generation
    if plan is None:
        conditions = cond.clear_condition(
            status.conditions,
            RECORDING,
            "NotConfigured",
            "spec.recording is not set",
            now=now,
            generation=generation,
        )
    else:
        conditions = cond.set_condition(
            status.conditions,
            RECORDING,
            plan.status,
            plan.reason,
            plan.message,
            now=now,
            generation=generation,
        )
    return status.model_copy(update={"conditions": conditions})
