"""A stage Job that runs on several pods: distributed training and sharded generation.

Training over nodes × processes runs the way Kubeflow Trainer v2's torch plugin runs it (what JobSet
does underneath, without JobSet): an Indexed Job with `completions = parallelism = nodes`, a headless
Service selecting this attempt's pods (`publishNotReadyAddresses`, so the group can rendezvous
before any pod is Ready) and the pods' `subdomain` set to it, so pod 0 is reachable as
`<job>-0.<service>`; `torchrun` is configured by `PET_*` env only (NODE_RANK from the
completion-index annotation). `backoffLimit: 0`: one failed rank fails the attempt, and the
operator's retry starts the whole group again, resuming from the last checkpoint.

Sharded generation is an Indexed Job of `shards` completions, each pod taking its own rows
(JOB_COMPLETION_INDEX, set by the Job controller); `backoffLimitPerIndex` retries a failed shard
alone, the others keep what they finished.
"""

from __future__ import annotations

from typing import Any

from kubedistill.api.models import DistillationJob, Stage
from kubedistill.domain.naming import rendezvous_service_name
from kubedistill.domain.scaling import stage_completions, train_world
from kubedistill.settings import GPU_RESOURCE, Settings

MASTER_PORT = 29500
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def _pet_env(job_name: str, service: str | None, nodes: int, procs: int) -> list[dict[str, Any]]:
    rank_ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(procs)},
        {"name": "PET_NODE_RANK", "valueFrom": rank_ref},
        {"name": "PET_MASTER_ADDR", "value": f"{job_name}-0.{service}" if service else "127.0.0.1"},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]


def _rendezvous_service(job_manifest: dict[str, Any], name: str) -> dict[str, Any]:
    meta = job_manifest["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": dict(meta["labels"]),
            "ownerReferences": meta["ownerReferences"],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            # This attempt's pods only: a retry's group never rendezvous with a dying one.
            "selector": dict(meta["labels"]),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def scale_out(
    job: DistillationJob, stage: Stage, settings: Settings, job_manifest: dict[str, Any]
) -> list[dict[str, Any]]:
    """The manifests to create ahead of `job_manifest` (a headless Service, or none), after turning
    the Job into an Indexed one where the stage runs on several pods or processes."""
    spec: dict[str, Any] = job_manifest["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    completions = stage_completions(job.spec, stage)
    if stage == Stage.GENERATE and completions > 1:
        spec.update(
            completionMode="Indexed",
            completions=completions,
            parallelism=completions,
            backoffLimitPerIndex=job.spec.retries,
        )
        # A global backoffLimit would fail every shard at the first failure of one.
        spec.pop("backoffLimit", None)
        return []
    if stage != Stage.TRAIN or job.spec.training.distributed is None:
        return []
    world = train_world(job.spec, settings)
    name = job_manifest["metadata"]["name"]
    spec.update(completionMode="Indexed", completions=world.nodes, parallelism=world.nodes, backoffLimit=0)
    service = rendezvous_service_name(name) if world.nodes > 1 else None
    container["env"] = container["env"] + _pet_env(name, service, world.nodes, world.procs_per_node)
    if world.gpus_per_node:
        container["resources"].setdefault("limits", {})[GPU_RESOURCE] = str(world.gpus_per_node)
    if service is None:
        return []
    pod["subdomain"] = service
    return [_rendezvous_service(job_manifest, service)]
