"""Observation: turn child Jobs, their pods, Secrets and stage files into `phases.Observed`.

`summarise_*` are pure (dicts in, dataclasses out) so they are tested without a cluster; the async
functions around them do the reads. Stage files (result.json, progress.json) go through
`kubedistill.store`, which is blocking, so they run in a worker thread. No dataset is read here: the
estimate is a stage Job of its own, in the job's namespace with the job's credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from kubedistill import store
from kubedistill.api.models import DistillationJob, Stage
from kubedistill.api.stage import PROGRESS_FILE, RESULT_FILE, StageProgress, StageResult, part_uri
from kubedistill.builders import build_invocation, referenced_secrets
from kubedistill.builders.stage_job import CONTAINER
from kubedistill.domain.conditions import parse_time
from kubedistill.domain.naming import LABEL_ATTEMPT, LABEL_STAGE
from kubedistill.domain.observation import ChildJob, PodSummary, parse_termination_message
from kubedistill.domain.parts import merge_progress, merge_results
from kubedistill.domain.plan import skipped_stages
from kubedistill.domain.queueing import JOB_UID_LABEL, QUEUE_LABEL, summarise_workload
from kubedistill.domain.scaling import stage_completions
from kubedistill.k8s import resources
from kubedistill.k8s.client import Kube
from kubedistill.settings import Settings

Obj = dict[str, Any]


def _true(conditions: Sequence[Obj], type_: str) -> Obj | None:
    return next((c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None)


def summarise_pod(pod: Obj) -> PodSummary:
    status = pod.get("status") or {}
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    unschedulable = None
    if (
        scheduled is not None
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
    ):
        unschedulable = scheduled.get("message") or "Unschedulable"
    containers = status.get("containerStatuses") or []
    mine = next((c for c in containers if c.get("name") == CONTAINER), containers[0] if containers else {})
    state = mine.get("state") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    return PodSummary(
        phase=status.get("phase") or "Pending",
        unschedulable=unschedulable,
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
        termination_message=terminated.get("message"),
        exit_code=terminated.get("exitCode"),
    )


def summarise_job(job: Obj, pods: Sequence[Obj]) -> ChildJob | None:
    """One child Job with its newest pod; None for a Job without our stage/attempt labels."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        stage, attempt = Stage(labels.get(LABEL_STAGE, "")), int(labels.get(LABEL_ATTEMPT, ""))
    except ValueError:
        return None
    status = job.get("status") or {}
    conditions = status.get("conditions") or []
    complete = _true(conditions, "Complete") or _true(conditions, "SuccessCriteriaMet")
    failed = _true(conditions, "Failed") or _true(conditions, "FailureTarget")
    uid = meta.get("uid")
    own = [
        p
        for p in pods
        if any(o.get("uid") == uid for o in (p.get("metadata") or {}).get("ownerReferences") or [])
    ]
    newest = max(own, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", default=None)
    pod = summarise_pod(newest) if newest is not None else None
    finished = status.get("completionTime") or (failed or complete or {}).get("lastTransitionTime")
    return ChildJob(
        name=meta.get("name", ""),
        stage=stage,
        attempt=attempt,
        created_at=parse_time(meta.get("creationTimestamp")),
        finished_at=parse_time(finished) if (complete or failed) else None,
        succeeded=complete is not None,
        failed=failed is not None and complete is None,
        failure_reason=(failed or {}).get("reason"),
        suspended=bool((job.get("spec") or {}).get("suspend")),
        pod=pod,
        result=parse_termination_message(pod.termination_message) if pod is not None else None,
        queue=labels.get(QUEUE_LABEL),
    )


# ------------------------------------------------------------------------------------------- reads


async def observe_children(kube: Kube, job: DistillationJob, settings: Settings) -> tuple[ChildJob, ...]:
    namespace, name = job.metadata.namespace or "default", job.metadata.name
    jobs = await resources.list_child_jobs(kube, namespace, name)
    # Pods only matter for Jobs that exist; a new job (the common first pass) skips the request.
    pods = await resources.list_child_pods(kube, namespace, name) if jobs else []
    children = [c for c in (summarise_job(j, pods) for j in jobs) if c is not None]
    children = await _with_workloads(kube, namespace, jobs, children)
    recorded = {s.name for s in (job.status.stages if job.status else []) if s.state == "Succeeded"}
    completed: list[ChildJob] = []
    for child in children:
        parts = stage_completions(job.spec, child.stage) if child.stage == Stage.GENERATE else 1
        # A finished stage without a parsable termination message: its result.json says what it did.
        # A sharded one's pods each say what their part did: the sum is the stage's result.
        if child.finished and (child.result is None or parts > 1) and child.stage not in recorded:
            stage_uri = build_invocation(job, child.stage, child.attempt, settings).stage_uri()
            result: StageResult | None
            if parts > 1:
                result = await asyncio.to_thread(_merged_result, stage_uri, parts)
            else:
                result = await asyncio.to_thread(store.read_model, f"{stage_uri}/{RESULT_FILE}", StageResult)
            child = ChildJob(**{**child.__dict__, "result": result})
        completed.append(child)
    return tuple(completed)


async def _with_workloads(
    kube: Kube, namespace: str, jobs: Sequence[Obj], children: list[ChildJob]
) -> list[ChildJob]:
    """Attach Kueue's Workload to each unfinished queued Job (one list call, none without a queue)."""
    queued = {c.name for c in children if c.queue is not None and not c.finished}
    uids = {j["metadata"]["uid"]: j["metadata"]["name"] for j in jobs if j["metadata"]["name"] in queued}
    if not uids:
        return children
    workloads = await resources.list_workloads(kube, namespace, sorted(uids))
    by_job = {
        uids[uid]: summarise_workload(w)
        for w in workloads
        if (uid := ((w.get("metadata") or {}).get("labels") or {}).get(JOB_UID_LABEL)) in uids
    }
    return [replace(c, workload=by_job.get(c.name)) for c in children]


async def missing_secrets(kube: Kube, job: DistillationJob, settings: Settings) -> tuple[str, ...]:
    """Secrets the remaining stages reference that do not exist (names only, values are never read)."""
    namespace = job.metadata.namespace or "default"
    wanted: dict[str, str | None] = {}
    for stage in Stage:
        if stage not in skipped_stages(job.spec):
            for secret, key in referenced_secrets(job, stage, settings):
                wanted.setdefault(secret, key)
    found = await asyncio.gather(*(resources.secret_exists(kube, namespace, s) for s in wanted))
    missing = []
    for (secret, key), exists in zip(wanted.items(), found, strict=True):
        if not exists:
            what = f"key {key}" if key else "keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"
            missing.append(f"Secret {secret} ({what}) not found in namespace {namespace}")
    return tuple(missing)


async def read_progress(
    job: DistillationJob, stage: Stage, attempt: int, settings: Settings
) -> StageProgress | None:
    stage_uri = build_invocation(job, stage, attempt, settings).stage_uri()
    parts = stage_completions(job.spec, stage) if stage == Stage.GENERATE else 1
    if parts > 1:
        return await asyncio.to_thread(_merged_progress, stage_uri, parts)
    progress: StageProgress | None = await asyncio.to_thread(
        store.read_model, f"{stage_uri}/{PROGRESS_FILE}", StageProgress
    )
    return progress


def _merged_result(stage_uri: str, parts: int) -> StageResult:
    return merge_results(
        [store.read_model(f"{part_uri(stage_uri, i)}/{RESULT_FILE}", StageResult) for i in range(parts)]
    )


def _merged_progress(stage_uri: str, parts: int) -> StageProgress | None:
    found = [
        store.read_model(f"{part_uri(stage_uri, i)}/{PROGRESS_FILE}", StageProgress) for i in range(parts)
    ]
    return merge_progress([p for p in found if p is not None])
