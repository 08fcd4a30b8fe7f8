"""The tiny random Llama (:mod:`kubedistill.local.tiny_model`) as a GGUF, made once per machine.

Serving tests and benchmarks need a file llama-server loads, not a training run: llama.cpp's own converter
(the export stage's, from the llama-cpp-python sdist) turns the tiny model into q8_0 once, cached under
``$KUBEDISTILL_CACHE/<tiny model dir>-gguf/`` with a lock.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kubedistill.local.tiny_model import tiny_llama
from kubedistill_testing.cache import file_lock

OUTTYPE = "q8_0"


def tiny_gguf() -> Path:
    model = tiny_llama()
    target = model.with_name(f"{model.name}-gguf") / f"model-{OUTTYPE}.gguf"
    if target.is_file():
        return target
    # The export stage's converter; imported here only, as it pulls in the trainer's stack.
    from kubedistill_trainer.export import convert_to_gguf, converter_dir

    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_suffix(".lock")):
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                partial = Path(tmp) / target.name
                convert_to_gguf(model, partial, converter_dir(), OUTTYPE)
                partial.rename(target)
    return target
