"""Where a student's weights come from, and loading them for training or inference.

`spec.student.model` may be
- a catalog id (`qwen3-0.6b`) → its Hugging Face id,
- a Hugging Face id (`Qwen/Qwen3-0.6B`) → the hub, or its local cache when HF_HUB_OFFLINE=1,
- a local directory or `file://` directory → that directory,
- a `file://…/x.gguf` (or a local .gguf path) → transformers dequantises it (`gguf_file=`),
- an `s3://` prefix of a model directory → downloaded once into a local cache, then as a directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from kubedistill import store
from kubedistill.catalog import Catalog, load_catalog

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "KUBEDISTILL_MODEL_CACHE"


@dataclass(frozen=True)
class StudentSource:
    """What `from_pretrained` gets: a hub id or a local directory, plus a GGUF file name inside it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def model_kwargs(self) -> dict[str, Any]:
        """For a GGUF: dequantise into a plain dense model, which LoRA trains and `save_pretrained` writes
        (left in GGUF blocks, transformers refuses to save it)."""
        if not self.gguf_file:
            return {}
        from transformers import GgufConfig

        return {"gguf_file": self.gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def _model_cache() -> Path:
    default = Path.home() / ".cache" / "kubedistill" / "models"
    return Path(os.environ.get(MODEL_CACHE_ENV, default))


def _local(path: Path) -> StudentSource:
    if path.suffix == ".gguf":
        return StudentSource(str(path.parent), path.name)
    return StudentSource(str(path))


def resolve_student(model: str, catalog: Catalog | None = None) -> StudentSource:
    """Map `spec.student.model` to a `from_pretrained` source (downloading s3:// prefixes)."""
    parsed = urlparse(model)
    if parsed.scheme == "file":
        return _local(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        digest = hashlib.sha256(model.encode()).hexdigest()[:16]
        target = _model_cache() / digest
        if not (target / ".complete").is_file():
            store.get_tree(model.removesuffix(".gguf") if model.endswith(".gguf") else model, target)
            (target / ".complete").touch()
        if model.endswith(".gguf"):
            return StudentSource(str(target), model.rsplit("/", 1)[-1])
        return StudentSource(str(target))
    if model.startswith(("/", "./", "../")) or Path(model).exists():
        return _local(Path(model))
    entry = (catalog or load_catalog()).student(model)
    return StudentSource(entry.hf_id if entry else model)


def lora_targets(model: str, requested: list[str] | None, catalog: Catalog | None = None) -> list[str] | str:
    """The spec's modules, else the catalog's for this student, else every linear projection."""
    if requested:
        return list(requested)
    return (catalog or load_catalog()).lora_targets(model) or "all-linear"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_dtype() -> torch.dtype:
    import torch

    # bf16 on GPUs; fp32 on CPU, where bf16 matmuls are slow and the tiny models need no saving.
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def unsloth_available() -> bool:
    """Unsloth only where it works in practice: CUDA present and the package importable (DESIGN §6)."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def load_tokenizer(source: StudentSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: StudentSource, dtype: torch.dtype | None = None) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=dtype or train_dtype(), **source.model_kwargs()
    )
    return model.to(device())  # type: ignore[arg-type]  # transformers types .to() oddly


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text the student sees before it answers: its chat template, else a plain format."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], answer: str
) -> str:
    """The prompt followed by `answer` as the assistant's turn, ending where the template ends it."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        )
        return str(text)
    return render_prompt(tokenizer, messages) + answer + (tokenizer.eos_token or "")
