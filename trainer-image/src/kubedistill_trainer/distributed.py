"""Data-parallel training across processes and nodes (DESIGN §4, "Distributed training").

The operator runs the train stage on an Indexed Job and configures `torchrun` the way Kubeflow
Trainer's torch plugin does, through `PET_*` env (`PET_NNODES`, `PET_NPROC_PER_NODE`,
`PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT`). The image's entrypoint stays
`python -m kubedistill_trainer train`: when it sees `PET_NNODES` and is not yet a torchrun worker it
replaces itself with torchrun, which starts one worker per process on the node and sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK` for each.

The global batch does not depend on the world size: a step is still `gradientAccumulation`
micro-batches of `batchSize` prompts, the same micro-batches a single process would take, dealt out
round-robin to the ranks. Each rank scales its losses by `world / gradientAccumulation`, and DDP's
gradient mean over ranks then yields exactly the single-process gradient (up to float summation
order). Every rank therefore needs at least one micro-batch a step: `gradientAccumulation ≥ world`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubedistill_trainer.runtime import StageFailure

log = logging.getLogger(__name__)

# Set by torchrun for each worker it starts; its absence means "not launched yet".
WORKER_ENV = "LOCAL_RANK"
NNODES_ENV = "PET_NNODES"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        """Only rank 0 writes: checkpoints, losses, progress, the adapter and result.json."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(environ: Mapping[str, str] | None = None) -> World:
    env = os.environ if environ is None else environ
    return World(
        rank=int(env.get("RANK", "0")),
        size=int(env.get("WORLD_SIZE", "1")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
    )


def torchrun_argv(stage: str, environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The torchrun command line this process should become, or None when it is to run the stage itself."""
    env = os.environ if environ is None else environ
    if NNODES_ENV not in env or WORKER_ENV in env:
        return None
    # torchrun reads every option it is not given from PET_<OPTION>; the stage is its module's argument.
    return [sys.executable, "-m", "torch.distributed.run", "--module", "kubedistill_trainer", stage]


_PR_SET_PDEATHSIG = 1


def die_with_agent(environ: Mapping[str, str] | None = None) -> None:
    """In a torchrun worker: be killed when the agent that started it dies.

    torchrun starts each worker in a session of its own, so a SIGKILL to the pod's process group (or
    the agent alone) would leave the worker training as an orphan that still holds its rank, writes
    checkpoints and races the retry's group. In a container the runtime kills the whole PID
    namespace; this keeps the same guarantee wherever it does not.
    """
    env = os.environ if environ is None else environ
    if WORKER_ENV not in env or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the line above
        os._exit(1)


def micro_batches_of(rank: int, size: int, gradient_accumulation: int) -> range:
    """This rank's share of a step's micro-batches (indices 0..GA-1), round-robin."""
    return range(rank, gradient_accumulation, size)


def check_world(w: World, gradient_accumulation: int) -> None:
    if w.size > gradient_accumulation:
        raise StageFailure(
            "InvalidDistributedConfig",
            f"{w.size} training processes but spec.training.gradientAccumulation is {gradient_accumulation}: "
            "each process takes whole micro-batches of the global batch, so gradientAccumulation must be "
            "at least nodes × processes per node",
        )


def start(w: World) -> str:
    """Join the process group (nccl on GPU, gloo on CPU); returns the backend, "" when single-process."""
    if not w.distributed:
        return ""
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group(backend)
    log.info(
        "rank %d of %d (%s), rendezvous at %s:%s",
        w.rank,
        w.size,
        backend,
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    )
    return backend


def stop(w: World) -> None:
    if w.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(model: Any, w: World) -> Any:
    """The module to run the policy forward through: DDP across ranks, the model itself alone."""
    if not w.distributed:
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ids = [w.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(model, device_ids=ids)


def sum_across(values: Sequence[float], w: World) -> list[float]:
    """Element-wise sum over all ranks (for reporting: loss parts, token counts)."""
    if not w.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    device = f"cuda:{w.local_rank}" if torch.cuda.is_available() else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu()]


def barrier(w: World) -> None:
    if w.distributed:
        import torch.distributed as dist

        dist.barrier()
