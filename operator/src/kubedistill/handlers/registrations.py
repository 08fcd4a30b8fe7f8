"""The kopf handlers: thin on purpose. Each parses what kopf hands it and calls the service in memo.

Handlers return None (kopf would store a returned value in status.<handler>) and patch status
themselves through the status subresource. Each job's reconcile loop is a task of ours (handlers.loops),
not a kopf daemon, so that kopf puts its finalizer only on the jobs the on-delete handler serves: those
that delete their artifacts with them. kopf also takes the finalizer off a job that no longer asks for
it, including, when the operator starts, every job an older operator left one on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import kopf

from kubedistill.api.models import GROUP, VERSION
from kubedistill.domain.deletion import DELETE_ARTIFACTS_FIELD, FINALIZER, is_deleting
from kubedistill.domain.naming import LABEL_MANAGED_BY, MANAGED_BY
from kubedistill.domain.serving import PROGRESSING, WATCHED_FAILURES
from kubedistill.handlers.alias import reconcile_alias
from kubedistill.handlers.gateway import is_gateway
from kubedistill.handlers.loops import JobLoops
from kubedistill.handlers.reconciler import Reconciler
from kubedistill.k8s import resources
from kubedistill.k8s.client import ApiError, Kube
from kubedistill.metrics import default_metrics
from kubedistill.settings import Settings, from_env, from_mapping

DJ = (GROUP, VERSION, "distillationjobs")
ALIAS = (GROUP, VERSION, "modelaliases")
SETTINGS_CONFIGMAP_ENV = "KUBEDISTILL_SETTINGS_CONFIGMAP"


def configure_kopf(settings: kopf.OperatorSettings, ours: Settings) -> None:
    # Handler progress and the diff-base live in our own annotations; the diff-base leaves out the
    # dataset, whose inline prompts could outgrow the 256 KiB annotation budget.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration", ignored_fields=["spec.dataset"]
    )
    # Our own transition events are the ones users read; kopf's per-handler chatter stays in logs.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "kubedistill-operator"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.peering.standalone = ours.peering is None
    if ours.peering is not None:
        settings.peering.name = ours.peering
        settings.peering.mandatory = True


async def settings_from_configmap(kube: Kube, base: Settings) -> Settings:
    """KUBEDISTILL_SETTINGS_CONFIGMAP names a ConfigMap (in the operator's namespace) whose keys override env."""
    name = os.environ.get(SETTINGS_CONFIGMAP_ENV)
    if not name:
        return base
    namespace = os.environ.get("POD_NAMESPACE") or _incluster_namespace() or "default"
    configmap = await resources.get_configmap(kube, namespace, name)
    if configmap is None:
        raise kopf.PermanentError(f"settings ConfigMap {namespace}/{name} not found")
    return from_mapping(configmap.get("data") or {}, base)


def _incluster_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def _post_event(body: dict[str, Any], *, type: str, reason: str, message: str) -> None:
    kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=type, reason=reason, message=message)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = from_env()
    kube = Kube.from_env()
    ours = await settings_from_configmap(kube, ours)
    configure_kopf(settings, ours)
    service = Reconciler(
        kube=kube,
        settings=ours,
        post_event=_post_event,
        metrics=default_metrics(),
    )
    memo.service = service
    memo.loops = JobLoops(run=service.run, wake=service.wake)
    if ours.gateway_enabled:
        memo.look_again = asyncio.create_task(look_again(service))
        # Registered only with serving on: without it the chart grants no access to Deployments.
        kopf.on.event("apps", "v1", "deployments", labels={LABEL_MANAGED_BY: MANAGED_BY})(
            serving_deployment_changed
        )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.loops.stop_all()
    if "look_again" in memo:
        memo.look_again.cancel()
    await memo.service.kube.close()


@kopf.on.event(*DJ)
async def distillation_job_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Every event of a job (the first listing included) keeps its one reconcile loop going and wakes it."""
    meta = body.get("metadata", {})
    namespace, name = meta.get("namespace") or "default", meta.get("name")
    if type == "DELETED" or is_deleting(body):
        await memo.loops.stop(namespace, name)
        if type == "DELETED":
            memo.service.forget_job(namespace, name)
        return
    if not memo.loops.ensure(namespace, name, dict(body)):
        memo.service.wake(namespace, name, meta.get("resourceVersion"))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_job_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    meta = body.get("metadata", {})
    if type == "DELETED":
        memo.service.forget_child(meta.get("namespace"), meta.get("name"))
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == "DistillationJob" and owner.get("controller"):
            memo.service.child_changed(meta.get("namespace"), owner.get("name"), dict(body))


@kopf.on.delete(*DJ, field=DELETE_ARTIFACTS_FIELD, value=True)
async def distillation_job_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Only jobs with spec.storage.deleteOnJobDeletion: the field filter is what limits the finalizer."""
    retry_after = await memo.service.finalize(dict(body))
    if retry_after is not None:
        raise kopf.TemporaryError("the job's stage pods or artifacts are not gone yet", delay=retry_after)


@kopf.on.event(*ALIAS)
async def alias_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Every alias event resolves it again (idempotent): no kopf state is kept on aliases at all.

    A deleted alias's servers go with it (ownerReferences); its routes leave the gateway's config here.
    """
    service: Reconciler = memo.service
    if type != "DELETED":
        await reconcile_alias(service.kube, dict(body), datetime.now(UTC), service.gateway)
    elif service.settings.gateway_enabled:
        await service.gateway.sync()


def _needs_a_look(alias: dict[str, Any]) -> bool:
    return any(
        (c.get("type") == PROGRESSING and c.get("status") == "True") or c.get("reason") in WATCHED_FAILURES
        for c in (alias.get("status") or {}).get("conditions") or []
    )


async def look_again(service: Reconciler, interval_s: float = 3.0) -> None:
    """While a swap is under way, look again: a pod that never becomes Ready changes no Deployment.

    Our own task rather than a kopf timer, which would put a finalizer on every alias.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            for alias in await service.gateway.list_aliases():
                body = alias.to_k8s()
                if _needs_a_look(body):
                    await reconcile_alias(service.kube, body, datetime.now(UTC), service.gateway)
        except (ApiError, aiohttp.ClientError) as err:
            logging.getLogger(__name__).warning("alias re-check failed: %s", err)


async def serving_deployment_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A model server or the gateway moved: the aliases it serves take the next step of their swap."""
    service: Reconciler = memo.service
    meta = body.get("metadata") or {}
    owners = [o.get("name") for o in meta.get("ownerReferences") or [] if o.get("kind") == "ModelAlias"]
    if is_gateway(dict(body), service.settings):
        aliases = [a.to_k8s() for a in await service.gateway.list_aliases()]
    else:
        namespace = meta.get("namespace") or "default"
        found = [await resources.get_alias(service.kube, namespace, n) for n in owners]
        aliases = [a for a in found if a is not None]
    for alias in aliases:
        await reconcile_alias(service.kube, alias, datetime.now(UTC), service.gateway)
