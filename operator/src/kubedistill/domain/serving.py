"""Serving a ModelAlias, pure: which servers exist, what the gateway routes, when an old server goes.

The swap order never drops a request:
  new server Ready → route it (status.served, rendered into the gateway's config) → the gateway's
  rollout with that config completes → the old server, now routed by no gateway pod, is deleted
  (its preStop drain and grace period let the requests it still holds finish).
A rollback is the same path with an older target. A new target that is not servable or never
becomes Ready leaves the old route in place, with Progressing=False and the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubedistill.api.alias import AliasTarget, ModelAlias, Role, ServedTarget
from kubedistill.api.models import DistillationJob, Phase, SecretKeyRef
from kubedistill.builders.gateway import Route
from kubedistill.builders.model_server import GgufSource, build_model_server, server_name, server_version
from kubedistill.settings import Settings

ROLES: tuple[Role, ...] = ("primary", "canary", "fallback")
RESOLVABLE = (Phase.PROMOTING, Phase.SUCCEEDED)
PROGRESSING = "Progressing"


class ServeReason:
    SERVING = "Serving"
    COMPLETE = "Complete"
    WAITING_FOR_SERVER = "WaitingForServer"
    WAITING_FOR_GATEWAY = "WaitingForGateway"
    SERVER_NOT_READY = "ServerNotReady"
    FETCH_FAILED = "FetchFailed"
    NOT_SERVABLE = "NotServable"
    JOB_NOT_FOUND = "JobNotFound"
    JOB_FAILED = "JobFailed"
    JOB_NOT_SUCCEEDED = "JobNotSucceeded"
    ARTIFACT_MISSING = "ArtifactMissing"
    MODEL_NAME_TAKEN = "ModelNameTaken"
    SECRET_NOT_FOUND = "SecretNotFound"
    NOT_SERVED = "NotServed"


# Reasons that may clear without a Deployment event (a job finishing, a GGUF appearing, a pod's retry):
# aliases in them are looked at again on a timer, like those in the middle of a swap.
WATCHED_FAILURES = frozenset(
    {
        ServeReason.JOB_NOT_SUCCEEDED,
        ServeReason.SECRET_NOT_FOUND,
        ServeReason.SERVER_NOT_READY,
        ServeReason.FETCH_FAILED,
        "Unschedulable",
    }
)


@dataclass(frozen=True)
class Provider:
    model: str
    base_url: str | None
    key: SecretKeyRef | None


@dataclass(frozen=True)
class Unresolved:
    reason: str
    message: str


Resolution = GgufSource | Provider | Unresolved


def resolve_target(target: AliasTarget, job: DistillationJob | None, settings: Settings) -> Resolution:
    """What one target serves: a GGUF (with the storage to read it with), a provider, or why neither."""
    if target.provider is not None:
        p = target.provider
        return Provider(model=p.model, base_url=p.base_url, key=p.api_key_secret_ref)
    if target.distillation_job is None:
        if target.gguf_uri is None:
            return Unresolved(ServeReason.NOT_SERVABLE, "an adapter without ggufURI cannot be served")
        return GgufSource(target.gguf_uri, settings.storage_endpoint, settings.storage_secret)
    name = target.distillation_job
    phase = job.status.phase if job is not None and job.status else None
    if job is None:
        return Unresolved(ServeReason.JOB_NOT_FOUND, f"DistillationJob {name} not found")
    if phase == Phase.FAILED:
        return Unresolved(ServeReason.JOB_FAILED, f"DistillationJob {name} failed")
    if phase not in RESOLVABLE:
        return Unresolved(ServeReason.JOB_NOT_SUCCEEDED, f"DistillationJob {name} is {phase or 'Pending'}")
    artifacts = job.status.artifacts if job.status else None
    gguf = (artifacts.gguf_uris or {}).get(target.quantization) if artifacts else None
    if gguf is None:
        return Unresolved(
            ServeReason.ARTIFACT_MISSING, f"DistillationJob {name} has no {target.quantization} GGUF"
        )
    storage = job.spec.storage
    return GgufSource(
        gguf,
        storage.endpoint or settings.storage_endpoint,
        storage.credentials_secret_ref or settings.storage_secret,
    )


@dataclass(frozen=True)
class ServerState:
    """A model server as observed: ready replicas, and the pods' own words when one cannot start."""

    ready_replicas: int = 0
    failure_reason: str | None = None
    failure_message: str | None = None


@dataclass(frozen=True)
class Desired:
    role: Role
    target: AliasTarget
    weight: int


def desired_targets(alias: ModelAlias) -> list[Desired]:
    spec = alias.spec
    canary = spec.canary.weight if spec.canary is not None else 0
    out = [Desired("primary", spec.target, 100 - canary)]
    if spec.canary is not None:
        target = AliasTarget.model_validate(spec.canary.model_dump(exclude={"weight"}))
        out.append(Desired("canary", target, canary))
    if spec.fallback is not None:
        out.append(Desired("fallback", AliasTarget.model_validate(spec.fallback.model_dump()), 0))
    return out


def provider_id(namespace: str, alias: str, role: Role, provider: Provider) -> str:
    digest = hashlib.sha256(f"{provider.model}|{provider.base_url}".encode()).hexdigest()[:8]
    return f"{namespace}/{alias}/{role}-provider-{digest}"


@dataclass
class ServePlan:
    """What to create, what to route (the new status.served), what to delete, and the two conditions."""

    create: list[dict[str, Any]] = field(default_factory=list)
    served: list[ServedTarget] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    ready: tuple[bool, str, str] = (False, ServeReason.NOT_SERVED, "")
    progressing: tuple[bool, str, str] = (False, ServeReason.COMPLETE, "")


def _problem(reason: str, message: str, role: Role) -> tuple[str, str]:
    return reason, f"{role}: {message}"


def plan_serving(
    alias: ModelAlias,
    resolutions: Mapping[Role, Resolution],
    servers: Mapping[str, ServerState],
    rolled_out_ids: frozenset[str] | None,
    settings: Settings,
) -> ServePlan:
    """One reconcile of the swap.

    `servers` are this alias's model servers by name; `rolled_out_ids` the deployment ids of the config
    every gateway pod runs (None while a gateway rollout is under way).
    """
    namespace = alias.metadata.namespace or "default"
    name = alias.metadata.name
    current = {s.role: s for s in (alias.status.served if alias.status else [])}
    plan = ServePlan()
    wanted_servers: set[str] = set()
    problems: list[tuple[str, str]] = []
    waiting: list[str] = []
    desired = desired_targets(alias)
    for want in desired:
        resolution = resolutions[want.role]
        new: ServedTarget | None = None
        if isinstance(resolution, Unresolved):
            problems.append(_problem(resolution.reason, resolution.message, want.role))
        elif isinstance(resolution, Provider):
            new = ServedTarget(
                role=want.role,
                target=want.target,
                weight=want.weight,
                deployment_id=provider_id(namespace, name, want.role, resolution),
            )
        else:
            image = alias.spec.server.image or settings.server_image
            server = server_name(name, server_version(resolution, alias.spec.server, image))
            wanted_servers.add(server)
            state = servers.get(server)
            if state is None:
                plan.create += build_model_server(alias, resolution, settings)
                waiting.append(f"{want.role}: starting model server {server}")
            elif state.ready_replicas > 0:
                new = ServedTarget(
                    role=want.role,
                    target=want.target,
                    weight=want.weight,
                    server=server,
                    ready_replicas=state.ready_replicas,
                    deployment_id=f"{namespace}/{server}",
                )
            elif state.failure_reason is not None:
                detail = (
                    f"model server {server} is not Ready: {state.failure_message or state.failure_reason}"
                )
                problems.append(_problem(state.failure_reason, detail, want.role))
            else:
                waiting.append(f"{want.role}: waiting for model server {server} to be Ready")
        kept = new or current.get(want.role)
        if kept is not None:
            if kept.server is not None:
                kept = kept.model_copy(
                    update={"ready_replicas": servers.get(kept.server, ServerState()).ready_replicas}
                )
            plan.served.append(kept.model_copy(update={"weight": want.weight}))
    _balance_weights(plan.served)
    routed_servers = {s.server for s in plan.served if s.server is not None}
    if rolled_out_ids is not None:
        plan.delete = sorted(
            s
            for s in servers
            if s not in wanted_servers
            and s not in routed_servers
            and f"{namespace}/{s}" not in rolled_out_ids
        )
    gateway_behind = rolled_out_ids is None or any(s.deployment_id not in rolled_out_ids for s in plan.served)
    primary = next((s for s in plan.served if s.role == "primary"), None)
    if primary is not None and rolled_out_ids is not None and primary.deployment_id in rolled_out_ids:
        plan.ready = (True, ServeReason.SERVING, f"model={name} is routed to {primary.deployment_id}")
    elif primary is None and problems:
        plan.ready = (False, problems[0][0], problems[0][1])
    else:
        plan.ready = (
            False,
            ServeReason.WAITING_FOR_GATEWAY if primary else ServeReason.WAITING_FOR_SERVER,
            "",
        )
    if problems:
        plan.progressing = (False, problems[0][0], "; ".join(m for _, m in problems))
    elif waiting:
        plan.progressing = (True, ServeReason.WAITING_FOR_SERVER, "; ".join(waiting))
    elif gateway_behind:
        plan.progressing = (
            True,
            ServeReason.WAITING_FOR_GATEWAY,
            "the gateway is rolling out the new routes",
        )
    elif plan.delete or len(servers) > len(routed_servers):
        plan.progressing = (True, ServeReason.WAITING_FOR_GATEWAY, "draining replaced model servers")
    else:
        plan.progressing = (False, ServeReason.COMPLETE, "every target is served and routed")
    return plan


def _balance_weights(served: list[ServedTarget]) -> None:
    """A canary without its primary (or the other way round) takes all the traffic it can get."""
    weighted = [s for s in served if s.role != "fallback"]
    if len(weighted) == 1 and weighted[0].weight != 100:
        served[served.index(weighted[0])] = weighted[0].model_copy(update={"weight": 100})


def gateway_routes(
    alias: ModelAlias, settings: Settings, key_env: Mapping[tuple[str, str], str]
) -> list[Route]:
    """The gateway's routes for what `alias.status.served` says it serves."""
    namespace = alias.metadata.namespace or "default"
    name = alias.metadata.name
    routes: list[Route] = []
    timeout = alias.spec.server.request_timeout_seconds
    for served in alias.status.served if alias.status else []:
        provider = served.target.provider
        if provider is not None:
            ref = provider.api_key_secret_ref
            routes.append(
                Route(
                    model_name=name,
                    role=served.role,
                    weight=served.weight,
                    deployment_id=served.deployment_id,
                    model=provider.model,
                    api_base=provider.base_url,
                    api_key_env=key_env.get((ref.name, ref.key)) if ref is not None else None,
                    timeout_seconds=timeout,
                )
            )
        elif served.server is not None:
            routes.append(
                Route(
                    model_name=name,
                    role=served.role,
                    weight=served.weight,
                    deployment_id=served.deployment_id,
                    model=f"openai/{name}",
                    api_base=f"http://{served.server}.{namespace}.svc.cluster.local:8080/v1",
                    api_key_env=None,
                    timeout_seconds=timeout,
                )
            )
    return routes


def name_owners(aliases: Sequence[ModelAlias]) -> dict[str, tuple[str, str]]:
    """Which (namespace, name) owns each routed model name: the oldest alias of that name."""
    owners: dict[str, tuple[str, str]] = {}
    ordered = sorted(
        aliases,
        key=lambda a: (
            str((a.metadata.model_extra or {}).get("creationTimestamp") or ""),
            a.metadata.namespace or "",
        ),
    )
    for alias in ordered:
        owners.setdefault(alias.metadata.name, (alias.metadata.namespace or "default", alias.metadata.name))
    return owners
