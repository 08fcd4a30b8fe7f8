"""The pure parts of the trainer's scale-out: when a pod becomes torchrun, which micro-batches a rank
takes, which rows a generation shard owns, and where a shard writes."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import JobRef, StageInvocation
from kubedistill.dataset import is_test, shard_of
from kubedistill_trainer import distributed
from kubedistill_trainer.runtime import StageFailure
from kubedistill_trainer.shards import SHARD_PREFIX, part_prefix


def test_a_pod_with_pet_env_becomes_torchrun_once() -> None:
    assert distributed.torchrun_argv("train", {}) is None
    argv = distributed.torchrun_argv("train", {"PET_NNODES": "2"})
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--module", "kubedistill_trainer", "train"]
    # A worker torchrun started (LOCAL_RANK set) runs the stage itself.
    assert distributed.torchrun_argv("train", {"PET_NNODES": "2", "LOCAL_RANK": "0"}) is None


def test_ranks_share_the_step_s_micro_batches_round_robin() -> None:
    shares = [list(distributed.micro_batches_of(r, 3, 8)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sorted(m for share in shares for m in share) == list(range(8))
    assert list(distributed.micro_batches_of(0, 1, 4)) == [0, 1, 2, 3]


def test_a_world_larger_than_the_micro_batches_is_refused() -> None:
    distributed.check_world(distributed.World(rank=0, size=4), 4)
    with pytest.raises(StageFailure) as caught:
        distributed.check_world(distributed.World(rank=1, size=4), 2)
    assert caught.value.reason == "InvalidDistributedConfig"
    w = distributed.world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.primary, w.distributed) == (3, 4, 1, False, True)
    assert distributed.world({}).primary and not distributed.world({}).distributed


def test_shards_split_rows_evenly_and_independently_of_the_test_split() -> None:
    ids = [f"row-{i}" for i in range(3000)]
    counts = Counter(shard_of(i, 3) for i in ids)
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 900
    held_out = [i for i in ids if is_test(i, 0.2)]
    assert min(Counter(shard_of(i, 3) for i in held_out).values()) > len(held_out) / 3 * 0.8
    assert all(shard_of(i, 1) == 0 for i in ids[:10])


def test_a_shard_writes_its_own_files() -> None:
    assert part_prefix(None) == SHARD_PREFIX
    assert part_prefix(2) == "candidates/part-0002/shard-"
    spec = DistillationJobSpec.model_validate(
        {
            "teacher": {"model": "t"},
            "student": {"model": "s"},
            "dataset": {"uri": "s3://b/d.jsonl"},
            "generation": {"shards": 3},
        }
    )
    inv = StageInvocation(
        job=JobRef(name="j", namespace="n", uid="u"),
        spec=spec,
        stage=Stage.GENERATE,
        artifact_base="s3://b/x",
    )
    assert inv.parts() == 3
    assert inv.report_uri({"JOB_COMPLETION_INDEX": "2"}) == "s3://b/x/generate/parts/0002"
    curate = inv.model_copy(update={"stage": Stage.CURATE})
    assert curate.parts() == 1 and curate.report_uri({"JOB_COMPLETION_INDEX": "2"}) == "s3://b/x/curate"
