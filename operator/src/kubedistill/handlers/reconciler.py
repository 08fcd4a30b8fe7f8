"""The reconcile loop of one DistillationJob: read → observe → decide (pure) → apply → patch status.

Each job gets one loop (a kopf daemon), so reconciles of the same job never overlap; watch events of
the job and of its child Jobs only wake the loop, so a burst of events costs one reconcile. The loop
sleeps for the decision's `requeue_after` (backoff, progress polling, deadlines, TTL) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from kubedistill import store
from kubedistill.api.alias import AliasTarget
from kubedistill.api.models import (
    API_VERSION,
    DistillationJob,
    DistillationJobStatus,
    Phase,
    StageState,
)
from kubedistill.builders import artifact_root, build_stage_manifests
from kubedistill.domain import conditions as cond
from kubedistill.domain.actions import CreateJob, Decision, DeleteJobs, Event, Promote, SetSuspend
from kubedistill.domain.alias import RESOLVABLE, promoted_job
from kubedistill.domain.deletion import is_deleting, terminating_message
from kubedistill.domain.naming import artifact_base
from kubedistill.domain.observation import Observed
from kubedistill.domain.phases import decide
from kubedistill.handlers.alias import reconcile_alias
from kubedistill.handlers.gateway import Gateway
from kubedistill.k8s import observe, resources
from kubedistill.k8s.client import ApiError, Kube
from kubedistill.metrics import OperatorMetrics, failure_reason
from kubedistill.settings import Settings

log = logging.getLogger("kubedistill.operator")

Key = tuple[str, str]
# With nothing scheduled, look again this often anyway: a missed watch event must not strand a job.
IDLE_RESYNC_S = 300.0
ERROR_BACKOFF_S = 5.0
# A deleted job's finalizer looks again this often while stage pods terminate, and after a failed
# artifact deletion (the store may be back).
FINALIZE_POLL_S = 1.0
FINALIZE_RETRY_S = 15.0
_QUIET_CHILD = json.dumps(["", False, False, False])


class JobGone(Exception):
    """The job no longer exists, or is being deleted: its reconcile loop ends."""


class EventPoster(Protocol):
    def __call__(self, body: dict[str, Any], *, type: str, reason: str, message: str) -> None: ...


class Stopped(Protocol):
    def __bool__(self) -> bool: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Reconciler:
    """The operator's service, kept in kopf's memo (built at startup, closed at cleanup)."""

    kube: Kube
    settings: Settings
    post_event: EventPoster
    metrics: OperatorMetrics | None = None
    clock: Callable[[], datetime] = _utcnow
    _wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    _written: dict[Key, str] = field(default_factory=dict)
    _child_signatures: dict[Key, str] = field(default_factory=dict)
    gateway: Gateway = field(init=False)

    def __post_init__(self) -> None:
        self.gateway = Gateway(self.kube, self.settings)

    # -- loop ---------------------------------------------------------------------------------------

    def child_changed(self, namespace: str, owner: str, child: dict[str, Any]) -> None:
        """Wake the owner only when the child Job changed in a way a decision can depend on: the Job
        controller rewrites status several times per pod (uncounted pods, ready counts), and each wake
        would cost a reconcile."""
        meta, status = child.get("metadata") or {}, child.get("status") or {}
        true = {c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"}
        # SuccessCriteriaMet/FailureTarget come a moment before Complete/Failed: one outcome, one wake.
        outcome = (
            "ok"
            if true & {"Complete", "SuccessCriteriaMet"}
            else "failed"
            if true & {"Failed", "FailureTarget"}
            else ""
        )
        signature = json.dumps(
            [
                outcome,
                bool(status.get("ready")),
                bool((child.get("spec") or {}).get("suspend")),
                meta.get("deletionTimestamp") is not None,
            ]
        )
        key = (namespace, meta.get("name", ""))
        previous = self._child_signatures.get(key)
        self._child_signatures[key] = signature
        # A Job first seen with nothing to report is one we just created (or one the loop lists
        # when it starts): no decision can change yet.
        if previous == signature or (previous is None and signature == _QUIET_CHILD):
            return
        self.wake(namespace, owner)

    def forget_child(self, namespace: str, name: str) -> None:
        self._child_signatures.pop((namespace, name), None)

    def wake(self, namespace: str, name: str, resource_version: str | None = None) -> None:
        """Ask for a reconcile; an event caused by our own status patch is ignored."""
        key = (namespace, name)
        if resource_version is not None and resource_version == self._written.get(key):
            return
        # No loop yet: it reconciles first thing when it starts, so there is nothing to remember.
        wakeup = self._wakeups.get(key)
        if wakeup is not None:
            wakeup.set()

    async def run(
        self, namespace: str, name: str, stopped: Stopped, body: dict[str, Any] | None = None
    ) -> None:
        """Reconcile until stopped or the job is gone; `body`, as the watch just delivered it, saves the
        first read."""
        key = (namespace, name)
        wakeup = self._wakeups.setdefault(key, asyncio.Event())
        try:
            while not stopped:
                wakeup.clear()
                try:
                    delay = await self.reconcile(namespace, name, body)
                    body = None
                except JobGone:
                    return
                except ApiError as err:
                    log.warning("reconcile failed: %s", err, extra={"job": name, "namespace": namespace})
                    if self.metrics is not None:
                        self.metrics.record_reconcile_error("distillationjob", err)
                    delay = ERROR_BACKOFF_S
                except Exception as err:  # the loop must outlive any one bad pass; it retries after a pause
                    log.exception("reconcile crashed", extra={"job": name, "namespace": namespace})
                    if self.metrics is not None:
                        self.metrics.record_reconcile_error("distillationjob", err)
                    delay = ERROR_BACKOFF_S
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        wakeup.wait(), IDLE_RESYNC_S if delay is None else max(0.05, delay)
                    )
        finally:
            self._wakeups.pop(key, None)
            self._written.pop(key, None)

    # -- one pass -----------------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str, body: dict[str, Any] | None = None) -> float | None:
        """One pass; the seconds until the next one is due (None: only when something changes)."""
        if body is None:
            body = await resources.get_distillation_job(self.kube, namespace, name)
        if body is None or is_deleting(body):
            raise JobGone(f"{namespace}/{name}")
        try:
            job = DistillationJob.model_validate(body)
        except ValidationError as err:
            await self._report_invalid(body, err)
            return None
        observed = await self.observe(job)
        decision = decide(job, observed, self.clock(), self.settings)
        await self.apply(job, decision)
        await self._publish(body, job, decision, observed)
        return decision.requeue_after

    async def observe(self, job: DistillationJob) -> Observed:
        status = job.status or DistillationJobStatus()
        terminal = cond.is_true(status.conditions, cond.COMPLETE) or cond.is_true(
            status.conditions, cond.FAILED
        )
        children = await observe.observe_children(self.kube, job, self.settings)
        if terminal:
            return Observed(children=children)
        missing = await observe.missing_secrets(self.kube, job, self.settings)
        running = [c for c in children if not c.finished and c.pod is not None and c.pod.phase == "Running"]
        progress = None
        if running:
            latest = max(running, key=lambda c: (c.stage, c.attempt))
            progress = await observe.read_progress(job, latest.stage, latest.attempt, self.settings)
        alias_job = None
        if status.phase == Phase.PROMOTING and job.spec.promotion.alias:
            alias = await resources.get_alias(
                self.kube, job.metadata.namespace or "default", job.spec.promotion.alias
            )
            alias_job = promoted_job(
                (alias or {}).get("spec") or {}, job.spec.promotion.canary_weight is not None
            )
        return Observed(
            children=children,
            missing_secrets=missing,
            progress=progress,
            alias_target_job=alias_job,
        )

    async def apply(self, job: DistillationJob, decision: Decision) -> None:
        namespace = job.metadata.namespace or "default"
        for action in decision.actions:
            if isinstance(action, CreateJob):
                await self._create_stage_job(job, action)
            elif isinstance(action, SetSuspend):
                await resources.set_job_suspend(self.kube, namespace, action.job_name, action.suspend)
            elif isinstance(action, DeleteJobs):
                for child in action.names:
                    await resources.delete_job(self.kube, namespace, child)
            elif isinstance(action, Promote):
                await self._promote(job, action)

    async def _create_stage_job(self, job: DistillationJob, action: CreateJob) -> None:
        manifests = build_stage_manifests(
            job,
            action.stage,
            action.attempt,
            self.settings,
            active_deadline_seconds=action.active_deadline_seconds,
        )
        created = False
        for manifest in manifests:
            _, created = await resources.create(self.kube, manifest)
        extra = {"job": job.metadata.name, "namespace": job.metadata.namespace, "stage": action.stage.value}
        log.info("stage Job %s (attempt %d)", "created" if created else "found", action.attempt, extra=extra)
        if created and self.metrics is not None:
            self.metrics.record_stage_attempt(action.stage.value)
            created_at = cond.parse_time((job.metadata.model_extra or {}).get("creationTimestamp"))
            if action.attempt == 1 and action.stage.value == "generate" and created_at is not None:
                self.metrics.observe_time_to_first_job((self.clock() - created_at).total_seconds())

    async def _promote(self, job: DistillationJob, action: Promote) -> None:
        namespace = job.metadata.namespace or "default"
        target = AliasTarget(distillation_job=job.metadata.name, quantization=action.quantization).to_k8s()
        existing = await resources.get_alias(self.kube, namespace, action.alias)
        if existing is None:
            manifest = {
                "apiVersion": API_VERSION,
                "kind": "ModelAlias",
                "metadata": {"name": action.alias, "namespace": namespace},
                "spec": {"target": target},
            }
            await resources.create(self.kube, manifest)
        elif job.spec.promotion.canary_weight is not None:
            canary = {**target, "weight": job.spec.promotion.canary_weight}
            if (existing.get("spec") or {}).get("canary") != canary:
                await resources.replace_alias_field(self.kube, namespace, action.alias, "canary", canary)
        elif (existing.get("spec") or {}).get("target") != target:
            await resources.replace_alias_field(self.kube, namespace, action.alias, "target", target)
        log.info(
            "alias %s points at this job",
            action.alias,
            extra={"job": job.metadata.name, "namespace": namespace},
        )

    async def _publish(
        self, body: dict[str, Any], job: DistillationJob, decision: Decision, observed: Observed
    ) -> None:
        namespace, name = job.metadata.namespace or "default", job.metadata.name
        new = decision.status.to_k8s()
        old = (job.status or DistillationJobStatus()).to_k8s()
        if new != old:
            body_status = dict(new)
            if decision.status.progress is not None:
                # Explicit nulls: a merge patch would otherwise keep the previous stage's detail.
                body_status["progress"] = decision.status.progress.model_dump(by_alias=True, mode="json")
            patched = await resources.patch_distillation_job_status(self.kube, namespace, name, body_status)
            self._written[(namespace, name)] = patched["metadata"]["resourceVersion"]
        for event in decision.events:
            self._event(body, event, name, namespace)
        was = job.status.phase if job.status else None
        if decision.status.phase in RESOLVABLE and was not in RESOLVABLE:
            await self._refresh_aliases(namespace, name)
        if self.metrics is not None:
            self.metrics.observe_job_phase(namespace, name, decision.status.phase)
            self._record_stage_outcomes(job, decision, observed)
            self.metrics.record_teacher_delta(
                job.spec.teacher.model, job.status.metrics if job.status else None, decision.status.metrics
            )

    def _event(self, body: dict[str, Any], event: Event, name: str, namespace: str) -> None:
        self.post_event(body, type=event.type, reason=event.reason, message=event.message[:1024])
        level = logging.WARNING if event.type == "Warning" else logging.INFO
        log.log(level, "%s: %s", event.reason, event.message, extra={"job": name, "namespace": namespace})

    def _record_stage_outcomes(self, job: DistillationJob, decision: Decision, observed: Observed) -> None:
        assert self.metrics is not None
        before = {s.name: s for s in (job.status.stages if job.status else [])}
        for entry in decision.status.stages:
            previous = before.get(entry.name)
            if previous is not None and previous.state == entry.state:
                continue
            if entry.state in (StageState.BACKOFF, StageState.FAILED):
                self.metrics.record_stage_failure(
                    entry.name.value, failure_reason(observed.children, entry.name)
                )
            if entry.state in (StageState.SUCCEEDED, StageState.FAILED):
                started, ended = cond.parse_time(entry.start_time), cond.parse_time(entry.completion_time)
                duration = (ended - started).total_seconds() if started and ended else None
                self.metrics.record_stage_finished(
                    entry.name.value, succeeded=entry.state == StageState.SUCCEEDED, duration_seconds=duration
                )

    async def _refresh_aliases(self, namespace: str, name: str) -> None:
        """Aliases naming this job resolve now that its artifacts are final (no alias timer needed)."""
        for alias in await resources.list_aliases(self.kube, namespace):
            if ((alias.get("spec") or {}).get("target") or {}).get("distillationJob") == name:
                await reconcile_alias(self.kube, alias, self.clock(), self.gateway)

    async def _report_invalid(self, body: dict[str, Any], err: ValidationError) -> None:
        """A spec the models refuse (the CRD schema should have): say so in the status, do nothing else."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors(include_url=False)[:5]
        )
        meta = body["metadata"]
        status = DistillationJobStatus.model_validate(body.get("status") or {})
        status.phase = Phase.FAILED
        status.conditions = cond.set_condition(
            status.conditions,
            cond.READY,
            "False",
            "InvalidSpec",
            problems,
            now=self.clock(),
            generation=meta.get("generation"),
        )
        if status.to_k8s() != (body.get("status") or {}):
            await resources.patch_distillation_job_status(
                self.kube, meta["namespace"], meta["name"], status.to_k8s()
            )

    # -- deletion -----------------------------------------------------------------------------------

    async def finalize(self, body: dict[str, Any]) -> float | None:
        """The finalizer's work for a job that deletes its artifacts with it: delete its stage Jobs, wait
        until their pods have stopped writing, then delete the artifacts. None once done; otherwise the
        seconds before trying again, with the `Deleting` condition saying what it waits for."""
        job = DistillationJob.model_validate(body)
        namespace, name = job.metadata.namespace or "default", job.metadata.name
        children = await resources.list_child_jobs(self.kube, namespace, name)
        for child in children:
            if not child["metadata"].get("deletionTimestamp"):
                await resources.delete_job(self.kube, namespace, child["metadata"]["name"])
        if children:
            pods = await resources.list_child_pods(self.kube, namespace, name)
            message = terminating_message(
                [c["metadata"]["name"] for c in children], [p["metadata"]["name"] for p in pods]
            )
            await self._report_deleting(body, cond.Reason.PODS_TERMINATING, message)
            return FINALIZE_POLL_S
        try:
            base = artifact_base(artifact_root(job, self.settings), namespace, name, job.metadata.uid or "")
            deleted = await asyncio.to_thread(store.delete_prefix, base + "/")
        except (store.StoreError, ValueError) as err:  # ValueError: no artifact storage is configured at all
            await self._report_deleting(
                body, cond.Reason.ARTIFACT_DELETION_FAILED, f"the artifacts could not be deleted: {err}"
            )
            return FINALIZE_RETRY_S
        log.info(
            "deleted %d artifact(s) under %s", deleted, base, extra={"job": name, "namespace": namespace}
        )
        return None

    def forget_job(self, namespace: str, name: str) -> None:
        """The job is gone: its per-job metrics go with it."""
        if self.metrics is not None:
            self.metrics.forget_job(namespace, name)

    async def _report_deleting(self, body: dict[str, Any], reason: str, message: str) -> None:
        meta = body["metadata"]
        status = DistillationJobStatus.model_validate(body.get("status") or {})
        conditions = cond.set_condition(
            status.conditions,
            cond.DELETING,
            "True",
            reason,
            message,
            now=self.clock(),
            generation=meta.get("generation"),
        )
        if conditions == status.conditions:
            return
        status.conditions = conditions
        await resources.patch_distillation_job_status(
            self.kube, meta["namespace"], meta["name"], {"conditions": status.to_k8s()["conditions"]}
        )
