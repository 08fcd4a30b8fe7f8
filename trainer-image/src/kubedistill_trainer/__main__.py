"""`python -m kubedistill_trainer STAGE`: run one pipeline stage under the stage contract.

`python -m kubedistill_trainer fetch --uri URI --out PATH` copies one artifact (see `fetch`).
Each stage lives in `kubedistill_trainer.<stage>` and exposes `run(inv) -> StageResult`. The module
is imported only once the stage is known, so `generate` never pays for importing torch.
"""

from __future__ import annotations

import importlib
import sys

from kubedistill.api.models import Stage
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
    module = importlib.import_module(f"kubedistill_trainer.{stage.value}")
    run_stage(module.run, stage)


if __name__ == "__main__":
    main(sys.argv[1:])
