"""`python -m kubedistill_trainer STAGE`: run one pipeline stage under the stage contract.

`python -m kubedistill_trainer fetch --uri URI --out PATH` copies one artifact (see `fetch`).
Each stage lives in `kubedistill_trainer.<stage>` and exposes `run(inv) -> StageResult`. The module
is imported only once the stage is known, so `generate` never pays for importing torch. In a pod of a
distributed train stage (`PET_NNODES` set) the process becomes torchrun first (distributed.py).
"""

from __future__ import annotations

import importlib
import os
import sys

from kubedistill.api.models import Stage
from kubedistill_trainer.distributed import die_with_agent, torchrun_argv
from kubedistill_trainer.runtime import run_stage

USAGE = f"usage: python -m kubedistill_trainer {{{','.join([*(s.value for s in Stage), 'fetch'])}}}"


def main(argv: list[str]) -> None:
    if argv[:1] == ["fetch"]:
        # Not a stage: the model server's init container, which copies a GGUF before llama-server starts.
        from kubedistill_trainer import fetch

        fetch.main(argv[1:])
        return
    if len(argv) != 1 or argv[0] not in {s.value for s in Stage}:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    stage = Stage(argv[0])
    launcher = torchrun_argv(stage.value)
    if launcher is not None:
        # A distributed stage pod: become torchrun (configured by the PET_* env), which starts the workers.
        os.execv(launcher[0], launcher)
    die_with_agent()
    module = importlib.import_module(f"kubedistill_trainer.{stage.value}")
    run_stage(module.run, stage)


if __name__ == "__main__":
    main(sys.argv[1:])
