"""The kopf handlers: thin on purpose. Each parses what kopf hands it and calls the service in memo.

Handlers return None (kopf would store a returned value in status.<handler>) and patch status
themselves through the status subresource.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import kopf

from kubedistill.api.models import GROUP, VERSION
from kubedistill.domain.naming import LABEL_MANAGED_BY, MANAGED_BY
from kubedistill.handlers.alias import reconcile_alias
from kubedistill.handlers.reconciler import Reconciler
from kubedistill.k8s import resources
from kubedistill.k8s.client import Kube
from kubedistill.metrics import default_metrics
from kubedistill.settings import Settings, from_env, from_mapping

DJ = (GROUP, VERSION, "distillationjobs")
ALIAS = (GROUP, VERSION, "modelaliases")
FINALIZER = f"{GROUP}/finalizer"
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
    memo.service = Reconciler(
        kube=kube,
        settings=ours,
        post_event=_post_event,
        metrics=default_metrics(),
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await memo.service.kube.close()


@kopf.daemon(*DJ, cancellation_timeout=1.0)
async def distillation_job(
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    """One reconcile loop per job for as long as it exists."""
    await memo.service.run(namespace or "default", name, stopped, dict(body))


@kopf.on.event(*DJ)
async def distillation_job_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body.get("metadata", {})
    memo.service.wake(meta.get("namespace"), meta.get("name"), meta.get("resourceVersion"))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def child_job_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    meta = body.get("metadata", {})
    if type == "DELETED":
        memo.service.forget_child(meta.get("namespace"), meta.get("name"))
    for owner in meta.get("ownerReferences") or []:
        if owner.get("kind") == "DistillationJob" and owner.get("controller"):
            memo.service.child_changed(meta.get("namespace"), owner.get("name"), dict(body))


@kopf.on.delete(*DJ)
async def distillation_job_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if not await memo.service.finalize(dict(body)):
        raise kopf.TemporaryError("waiting for the stage Jobs to go", delay=1)


@kopf.on.event(*ALIAS)
async def alias_changed(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Every alias event resolves it again (idempotent): no kopf state is kept on aliases at all."""
    if type != "DELETED":
        await reconcile_alias(memo.service.kube, dict(body), datetime.now(UTC))
