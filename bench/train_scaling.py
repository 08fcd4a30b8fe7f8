"""Benchmark: the train stage's steps per second with 1 and with 2 CPU processes (DDP over gloo).

The real stage (`python -m kubedistill_trainer train`) on the tiny random Llama, with the same global
batch (`--batch-size` × `--accumulation` prompts a step) and seed: once as one process, once
launched by torchrun from the PET_* env the operator sets (one node, two processes on 127.0.0.1),
interleaved 1, 2, 1 so load from other work hits both alike (the single process's faster run
counts). Steps/s is `steps / trainingTimeSec` from result.json: the training loop only, after the
model is loaded. Each process has one thread (OMP_NUM_THREADS=1), so two processes use two cores.

    python bench/train_scaling.py [--steps 20] [--batch-size 2] [--accumulation 4]

Ratios: `speedup_2_procs` = steps/s with 2 ÷ with 1, and `ddp_efficiency` = speedup ÷ 2 (1.0 is
linear scaling), both for information: on a shared 2-core machine the second process competes with
everything else, and a GPU run fills in the same figures on real hardware.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import child_pythonpath, finish, machine_banner, ratio
from kubedistill import store
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import JOB_ENV, JobRef, StageInvocation
from kubedistill.local.tiny_model import tiny_llama


def _curated(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"q{i}",
            "prompt": f"What is {i} plus {i}?",
            "chosen": [f"The answer is {2 * i}.", f"{2 * i}"],
            "rejected": [f"It is {i + 7}."] if i % 3 else [],
        }
        for i in range(n)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_train(base: str, spec: DistillationJobSpec, procs: int, workdir: Path) -> dict[str, Any]:
    """One train stage run; its result.json."""
    inv = StageInvocation(
        job=JobRef(name="bench", namespace="bench", uid=f"p{procs}"),
        spec=spec,
        stage=Stage.TRAIN,
        artifact_base=base,
    )
    env = {
        **os.environ,
        "PYTHONPATH": child_pythonpath(),
        JOB_ENV: inv.model_dump_json(by_alias=True),
        "KUBEDISTILL_TERMINATION_LOG": str(workdir / "termination"),
        "OMP_NUM_THREADS": "1",
    }
    if procs > 1:
        env |= {
            "PET_NNODES": "1",
            "PET_NPROC_PER_NODE": str(procs),
            "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(_free_port()),
        }
    done = subprocess.run(
        [sys.executable, "-m", "kubedistill_trainer", "train"], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"train with {procs} process(es) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = store.read_json(f"{base}/train/result.json")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    args = parser.parse_args()
    machine = machine_banner()
    spec = DistillationJobSpec.model_validate(
        {
            "teacher": {"model": "fake-teacher"},
            "student": {"model": str(tiny_llama())},
            "dataset": {"prompts": ["unused"]},
            "training": {
                "steps": args.steps,
                "batchSize": args.batch_size,
                "gradientAccumulation": args.accumulation,
                "checkpointEvery": args.steps,
                "maxSeqLength": 64,
                "lora": {"r": 8, "alpha": 16},
            },
        }
    )
    steps_per_s: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as tmp:
        for n, procs in enumerate((1, 2, 1)):
            base = (Path(tmp) / f"run-{n}").as_uri()
            store.write_jsonl(f"{base}/curate/curated/train.jsonl", _curated(32))
            result = run_train(base, spec, procs, Path(tmp))
            seconds = result["metrics"]["trainingTimeSec"]
            steps_per_s[procs].append(args.steps / seconds)
            print(f"{procs} process(es): {args.steps / seconds:.2f} steps/s", file=sys.stderr)
    one, two = max(steps_per_s[1]), steps_per_s[2][0]
    speedup = two / one
    finish(
        "train_scaling",
        [ratio("speedup_2_procs", speedup), ratio("ddp_efficiency", speedup / 2)],
        machine,
        ddp_efficiency=round(speedup / 2, 3),
        steps_per_second={"1": round(one, 3), "2": round(two, 3)},
        global_batch_prompts=args.batch_size * args.accumulation,
        steps=args.steps,
    )


if __name__ == "__main__":
    main()
