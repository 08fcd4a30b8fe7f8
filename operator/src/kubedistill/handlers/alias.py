"""ModelAlias reconcile: resolve the target (pure, `domain.alias`), then, with the gateway on, serve it
(pure plan, `domain.serving`): create model servers, route what is Ready, sync the gateway, delete what
no gateway pod routes to any more."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubedistill.api.alias import AliasTarget, Endpoint, ModelAlias, ModelAliasStatus, Role
from kubedistill.api.models import DistillationJob
from kubedistill.builders.gateway import gateway_url
from kubedistill.domain import conditions as cond
from kubedistill.domain.alias import (
    RESOLVED_TARGET_ANNOTATION,
    recorded_state,
    remember,
    resolve,
    serving_state,
    state_annotation,
)
from kubedistill.domain.serving import (
    PROGRESSING,
    Provider,
    Resolution,
    ServePlan,
    ServeReason,
    Unresolved,
    desired_targets,
    name_owners,
    plan_serving,
    resolve_target,
)
from kubedistill.domain.uri_policy import alias_violations, summary
from kubedistill.handlers.gateway import Gateway
from kubedistill.handlers.policy import POLICY_VIOLATION, namespace_policy
from kubedistill.handlers.recording import recording_plan, with_recording_condition
from kubedistill.k8s import resources
from kubedistill.k8s import serving as k8s
from kubedistill.k8s.client import Kube
from kubedistill.settings import Settings


async def _job(kube: Kube, namespace: str, target: AliasTarget) -> DistillationJob | None:
    if target.distillation_job is None:
        return None
    found = await resources.get_distillation_job(kube, namespace, target.distillation_job)
    return DistillationJob.model_validate(found) if found is not None else None


async def reconcile_alias(
    kube: Kube, body: dict[str, Any], now: datetime, settings: Settings, gateway: Gateway | None = None
) -> ModelAliasStatus:
    """Resolve the target; when the serving state (target, canary) changed since the last resolution,
    remember the previous one.

    The last resolved state is kept in an annotation, so a change is noticed even if the operator
    was down when it happened (a diff of watch events would miss it). A target outside the namespace's
    storage scope is refused before anything is read, and whatever already serves keeps serving.
    """
    alias = ModelAlias.model_validate(body)
    namespace = alias.metadata.namespace or "default"
    _, policy = await namespace_policy(kube, settings, namespace)
    violations = alias_violations(alias.spec, policy)
    if violations:
        return await _refuse(kube, alias, summary(violations), now)
    status = resolve(alias, await _job(kube, namespace, alias.spec.target), now)
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    state = serving_state(alias.spec)
    current = state_annotation(state)
    recorded = annotations.get(RESOLVED_TARGET_ANNOTATION)
    if recorded is not None and recorded != current:
        previous = recorded_state(recorded, state)
        if previous != state:  # else only the annotation's format changed
            status = remember(status, previous, now)
    plan = None
    if gateway is not None and gateway.settings.gateway_enabled:
        plan = await _plan(kube, alias, gateway)
        status = _serving_status(status, alias, plan, gateway, now)
    if gateway is not None:
        recording, _ = await recording_plan(kube, alias, gateway.settings)
        status = with_recording_condition(status, alias, recording, now)
    new = status.to_k8s()
    if new != (alias.status or ModelAliasStatus()).to_k8s():
        await resources.patch_alias_status(kube, namespace, alias.metadata.name, new)
    if recorded != current:
        await resources.annotate_alias(
            kube, namespace, alias.metadata.name, {RESOLVED_TARGET_ANNOTATION: current}
        )
    if plan is not None and gateway is not None:
        await gateway.sync()
        for name in plan.delete:
            await k8s.delete_server(kube, namespace, name)
    return status


async def _plan(kube: Kube, alias: ModelAlias, gateway: Gateway) -> ServePlan:
    namespace = alias.metadata.namespace or "default"
    settings = gateway.settings
    owner = name_owners(await gateway.list_aliases()).get(alias.metadata.name)
    if owner is not None and owner != (namespace, alias.metadata.name):
        message = f"model={alias.metadata.name} is routed to ModelAlias {owner[0]}/{owner[1]}, created first"
        taken = (False, ServeReason.MODEL_NAME_TAKEN, message)
        servers = await k8s.observe_servers(kube, namespace, alias.metadata.name)
        return ServePlan(delete=sorted(servers), ready=taken, progressing=taken)
    resolutions: dict[Role, Resolution] = {}
    for want in desired_targets(alias):
        resolution = resolve_target(want.target, await _job(kube, namespace, want.target), settings)
        key = resolution.key if isinstance(resolution, Provider) else None
        if key is not None and not await resources.secret_exists(kube, namespace, key.name):
            message = f"Secret {key.name} (the provider's apiKeySecretRef) not found"
            resolution = Unresolved(ServeReason.SECRET_NOT_FOUND, message)
        resolutions[want.role] = resolution
    servers = await k8s.observe_servers(kube, namespace, alias.metadata.name)
    plan = plan_serving(alias, resolutions, servers, await gateway.rolled_out_ids(), settings)
    for manifest in plan.create:
        await k8s.apply(kube, manifest)
    return plan


def _serving_status(
    status: ModelAliasStatus, alias: ModelAlias, plan: ServePlan, gateway: Gateway, now: datetime
) -> ModelAliasStatus:
    conditions = status.conditions
    for type_, (ok, reason, message) in ((cond.READY, plan.ready), (PROGRESSING, plan.progressing)):
        conditions = cond.set_condition(
            conditions,
            type_,
            "True" if ok else "False",
            reason,
            message,
            now=now,
            generation=alias.metadata.generation,
        )
    endpoint = Endpoint(url=gateway_url(gateway.settings), model=alias.metadata.name)
    return status.model_copy(update={"served": plan.served, "conditions": conditions, "endpoint": endpoint})


async def _refuse(kube: Kube, alias: ModelAlias, message: str, now: datetime) -> ModelAliasStatus:
    """A target outside the namespace's scope resolves to nothing; the Ready condition names the field."""
    status = (alias.status or ModelAliasStatus()).model_copy(update={"gguf_uri": None, "adapter_uri": None})
    status.model = None
    status.conditions = cond.set_condition(
        status.conditions,
        cond.READY,
        "False",
        POLICY_VIOLATION,
        message,
        now=now,
        generation=alias.metadata.generation,
    )
    namespace = alias.metadata.namespace or "default"
    if status.to_k8s() != (alias.status or ModelAliasStatus()).to_k8s():
        await resources.patch_alias_status(kube, namespace, alias.metadata.name, status.to_k8s())
    return status
