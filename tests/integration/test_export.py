"""The export stage on the tiny Llama: merge, llama.cpp's converter, q4_k_m + q8_0, load and generate."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import pytest
import torch
from model_stage_helpers import invocation, job_spec, run_stage
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from kubedistill import store
from kubedistill.api.models import Stage
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer import export, runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def student() -> Path:
    return tiny_llama()


def _write_adapter(student: Path, dest: Path) -> None:
    """A LoRA adapter with non-zero B, so merging really changes the weights."""
    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(str(dest))


def test_export_merges_converts_quantises_and_loads(tmp_path: Path, student: Path) -> None:
    base = (tmp_path / "job").as_uri()
    adapter_dir = tmp_path / "adapter"
    _write_adapter(student, adapter_dir)
    store.put_tree(adapter_dir, f"{base}/train/adapter")

    result, log = run_stage(invocation(base, Stage.EXPORT, job_spec(student)), tmp_path)
    assert result.ok, f"{result.message}\n{log[-3000:]}"

    # The merged model computes what base + adapter computes.
    merged_dir = tmp_path / "merged"
    assert result.artifacts.merged_uri is not None
    store.get_tree(result.artifacts.merged_uri, merged_dir)
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.model").is_file()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(plain, adapter_dir)(ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(merged, untouched, atol=1e-3)

    uris = result.artifacts.gguf_uris or {}
    assert set(uris) == {"q4_k_m", "q8_0"}
    expected_types = {"q4_k_m": {"Q4_K", "Q6_K"}, "q8_0": {"Q8_0"}}
    for quant, uri in uris.items():
        path = tmp_path / f"{quant}.gguf"
        store.get_file(uri, path)
        assert result.details[quant]["bytes"] == path.stat().st_size
        assert result.details[quant]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert result.details[quant]["smokeTokens"] == export.SMOKE_TOKENS
        # Every matrix took the requested quantisation: hidden 256 / FFN 1024 need no fallback type.
        matrices = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
        assert matrices <= expected_types[quant], (quant, matrices)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
        try:
            assert llm.metadata.get("tokenizer.chat_template"), "the chat template travels into the GGUF"
            out: Any = llm.create_completion("What is 2 plus 2?", max_tokens=6, temperature=0.0)
            assert out["usage"]["completion_tokens"] >= 1
        finally:
            llm.close()
    assert result.details["q4_k_m"]["bytes"] < result.details["q8_0"]["bytes"]


def test_missing_converter_is_named(tmp_path: Path, student: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = (tmp_path / "job").as_uri()
    store.write_json(f"{base}/train/adapter/adapter_config.json", {})
    monkeypatch.setenv(export.LLAMA_CPP_DIR_ENV, str(tmp_path / "no-llama.cpp"))
    result = runtime.execute(export.run, invocation(base, Stage.EXPORT, job_spec(student)))
    assert not result.ok
    assert result.reason == "ConverterMissing"
    assert str(tmp_path / "no-llama.cpp" / "convert_hf_to_gguf.py") in result.message


def test_missing_adapter_fails_clearly(tmp_path: Path, student: Path) -> None:
    base = (tmp_path / "job").as_uri()
    result = runtime.execute(export.run, invocation(base, Stage.EXPORT, job_spec(student)))
    assert not result.ok and result.reason == "MissingInput"
    assert "train" in result.message
