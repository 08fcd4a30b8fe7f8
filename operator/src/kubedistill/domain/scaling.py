"""How many pods and processes a stage runs on: distributed training (nodes × processes per node) and
sharded generation (shards), and the problems only the operator's settings reveal."""

from __future__ import annotations

from dataclasses import dataclass

from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.settings import Settings


@dataclass(frozen=True)
class TrainWorld:
    nodes: int = 1
    procs_per_node: int = 1
    # 0 on a CPU-only profile: the processes are CPU processes (gloo).
    gpus_per_node: int = 0

    @property
    def size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def distributed(self) -> bool:
        return self.size > 1


def train_gpus(spec: DistillationJobSpec, settings: Settings) -> int:
    """GPUs per train pod: distributed.gpusPerNode, else the stage override, else the operator's default."""
    d = spec.training.distributed
    if d is not None and d.gpus_per_node is not None:
        return d.gpus_per_node
    overrides = spec.resources.for_stage(Stage.TRAIN)
    if overrides is not None and overrides.gpus is not None:
        return overrides.gpus
    return settings.default_gpus[Stage.TRAIN]


def train_world(spec: DistillationJobSpec, settings: Settings) -> TrainWorld:
    """One torchrun process per GPU; on CPU `procsPerNode` (default 1)."""
    d = spec.training.distributed
    gpus = train_gpus(spec, settings)
    if d is None:
        return TrainWorld(gpus_per_node=gpus)
    procs = gpus if gpus > 0 else (d.procs_per_node or 1)
    return TrainWorld(nodes=d.nodes, procs_per_node=procs, gpus_per_node=gpus)


def stage_completions(spec: DistillationJobSpec, stage: Stage) -> int:
    """Pods of one attempt (an Indexed Job's completions when > 1, and for any distributed train)."""
    if stage == Stage.GENERATE:
        return spec.generation.shards
    if stage == Stage.TRAIN and spec.training.distributed is not None:
        return spec.training.distributed.nodes
    return 1


def settings_problem(spec: DistillationJobSpec, settings: Settings) -> str | None:
    """What makes this spec impossible on this operator (the CRD's rules cannot see its settings)."""
    d = spec.training.distributed
    if d is None:
        return None
    if d.gpus_per_node is not None and settings.default_gpus[Stage.TRAIN] == 0:
        return (
            "spec.training.distributed.gpusPerNode is set but this operator runs a CPU-only profile "
            "(KUBEDISTILL_DEFAULT_TRAIN_GPUS=0): use spec.training.distributed.procsPerNode"
        )
    world = train_world(spec, settings)
    if world.gpus_per_node and d.procs_per_node is not None:
        return "spec.training.distributed.procsPerNode applies only without GPUs: set gpusPerNode instead"
    if world.size > spec.training.gradient_accumulation:
        return (
            f"spec.training.gradientAccumulation ({spec.training.gradient_accumulation}) must be at least "
            f"distributed.nodes × processes per node ({world.nodes} × {world.procs_per_node}): each process "
            "takes whole micro-batches of the global batch"
        )
    return None
