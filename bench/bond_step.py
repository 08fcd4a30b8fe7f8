"""Benchmark: one BOND optimiser step against what the machine must do anyway, measured in the same run.

Same tiny random Llama, same LoRA (r 16, all projections), same AdamW, same P prompts each with one
chosen and one rejected answer, all batches made by the trainer's own `collate`. Steps, each the
median of `--steps` after warm-up:

- **BOND**: the train stage's step — policy forward and backward on chosen + rejected rows, the
  reference forward (adapters off, no grad), the BOND loss.
- **plain SFT**: a plain PyTorch step on the chosen rows only — forward, token-mean NLL, backward,
  clip, AdamW: what the cheapest fine-tune of the same data costs.
- **physical estimate** of BOND: twice the tokens of plain SFT (the same plain step on chosen +
  rejected rows, measured) plus one forward of those rows without grad (measured). BOND ÷ this
  is what the BOND loss itself (exact KL over the vocabulary, preference term) adds.
- **TRL**: TRL's SFTTrainer on the chosen rows, shown for information, as TRL configures it by
  default and with two of SFTConfig's defaults turned off in turn, with cProfile over three steps
  after the timed ones (`trl_profile` in the JSON). Why it is slow here, measured on this
  repository's 2-core AMD EPYC (no AVX-512, so no bf16 instructions: `cpu_bf16_instructions` in
  the JSON), load average 1.6: TRL's step was 34.9× the plain step (2539 vs 73 ms), 1.97× with
  `bf16=False`, 1.32× with `bf16=False` and `gradient_checkpointing=False`. SFTConfig defaults to
  bf16, and bfloat16 autocast on a CPU without bf16 instructions runs emulated matmuls, most of them
  in the backward (89% of TRL's profiled time was the autograd engine) — which is why TRL's step
  moved 70× between two machines while ours moved 3.7×. Its default gradient checkpointing runs
  every forward twice; its fused LM head (entropy and top-1 accuracy beside the log-probabilities)
  took about 2% of its time, its data collator (padding) and metric gathering 0%.

Every side runs in this process with the same torch threads, interleaved (BOND, plain, BOND), so
load from other work hits them alike; the BOND figure is the faster of its two medians.

    python bench/bond_step.py [--prompts 4] [--steps 15]

Ratios (targets): `bond_vs_physical` ≤ 1.3, `bond_vs_plain_sft` ≤ 3.5 (the physical floor is about
2.7: twice the tokens, forward and backward, plus a forward), `trl_vs_plain_sft` for information.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from _common import finish, machine_banner, ratio
from kubedistill.api.models import TrainingSpec
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer.bond import token_logps
from kubedistill_trainer.train import _logits_from, bond_step_loss, first_response_label
from kubedistill_trainer.train_data import Batch, Encoded, Example, collate, encode_example

WARMUP = 3
# TRL steps run under cProfile after the timed ones (profiling slows what it watches).
PROFILED = 3
# Where TRL's step time goes: the largest cProfile cumulative time among functions whose "path:name"
# contains one of these (so a part's nested calls are not counted twice).
TRL_PARTS = {
    "activation checkpointing (forward recomputed in backward)": ("torch/utils/checkpoint.py",),
    "fused LM head forward (log-probs, entropy, top-1)": ("chunked_logprob.py:forward",),
    "fused LM head backward (logits recomputed per tile)": ("chunked_logprob.py:backward",),
    "backbone forward (Llama + LoRA)": ("modeling_llama.py:forward",),
    "backward, all of it": ("run_backward",),
    "data collator (padding)": ("sft_trainer.py:torch_call",),
    "metrics gather (accelerate)": ("gather_for_metrics",),
    "optimizer step": ("adamw",),
}


def cpu_bf16_instructions() -> list[str]:
    """The CPU's bfloat16 instruction sets (AVX-512 BF16, AMX); without them torch emulates bf16 matmuls."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")})


def _lora() -> LoraConfig:
    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def _examples(n: int) -> list[Example]:
    filler = "Because the sum of two equal numbers is twice the number, we add them and report the total."
    return [
        Example(
            id=f"b{i}",
            messages=[{"role": "user", "content": f"What is {i} plus {i}? Explain the steps."}],
            chosen=(f"{filler} So {i} plus {i} is {2 * i}. {filler}",),
            rejected=(f"{filler} So {i} plus {i} is {i + 5}. {filler}",),
        )
        for i in range(n)
    ]


def _model(model_dir: str) -> Any:
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), _lora())
    model.train()
    return model


def _median_step(model: Any, loss_of: Callable[[Any], Any], steps: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        loss_of(model).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sft_loss(model: Any, batch: Batch) -> Any:
    """Token-mean NLL on every row's answer tokens: plain SFT, no reference, no extra terms."""
    start = first_response_label(batch)
    logits = _logits_from(model, batch.input_ids, batch.attention_mask, start)
    mask = batch.response_mask[:, start:].float()
    logps = token_logps(logits, batch.input_ids[:, start + 1 :])
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


def _median_reference_forward(model: Any, batch: Batch, steps: int) -> float:
    start = first_response_label(batch)
    times = []
    for i in range(WARMUP + steps):
        begin = time.perf_counter()
        with torch.no_grad(), model.disable_adapter():
            _logits_from(model, batch.input_ids, batch.attention_mask, start)
        if i >= WARMUP:
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


class _StepTimer(TrainerCallback):
    """Times every step; profiles the last `profiled` steps whole (the collator runs between steps, so
    the window opens at the end of one step and closes at the end of the last)."""

    def __init__(self, profile_after: int, profiled: int) -> None:
        self.times: list[float] = []
        self.profile = cProfile.Profile()
        self._start = 0.0
        self._window = (profile_after, profile_after + profiled)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)
        if state.global_step == self._window[0]:
            self.profile.enable()
        elif state.global_step == self._window[1]:
            self.profile.disable()


def _trl(
    model_dir: str, rows: list[dict[str, list[int]]], steps: int, **changes: Any
) -> tuple[float, dict[str, float]]:
    """TRL's median step (unprofiled steps), and the share of the profiled steps' time in each TRL_PARTS.

    `changes`: SFTConfig fields set against TRL's defaults (bf16, gradient_checkpointing), to measure
    what each default costs here.
    """
    torch.manual_seed(0)
    timer = _StepTimer(profile_after=WARMUP + steps, profiled=PROFILED)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=len(rows),
            max_steps=WARMUP + steps + PROFILED,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            completion_only_loss=True,
            max_length=None,
            dataloader_num_workers=0,
            disable_tqdm=True,
            **changes,
        )
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            peft_config=_lora(),
            callbacks=[timer],
        )
        trainer.train()
        timer.profile.disable()
    stats: Any = pstats.Stats(
        timer.profile
    ).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values()) or 1.0
    shares = {}
    for part, needles in TRL_PARTS.items():
        # The largest cumulative time among matching functions: nested matches are not added twice.
        matching = [
            v[3]
            for (path, _, name), v in stats.items()
            if any(n in f"{path}:{name}".lower() for n in needles)
        ]
        shares[part] = round(max(matching, default=0.0) / total, 3)
    return statistics.median(timer.times[WARMUP : WARMUP + steps]), shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    machine = machine_banner()

    model_dir = str(tiny_llama())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    encoded = [encode_example(tokenizer, ex, 512) for ex in _examples(args.prompts)]
    bond_batch = collate([(enc, 0) for enc in encoded], pad_id)
    chosen_only = collate([(replace(enc, rejected=()), 0) for enc in encoded], pad_id)
    # Every row of the BOND batch as a chosen one: the same tokens, trained on by plain SFT.
    all_rows = [Encoded(chosen=(*enc.chosen, *enc.rejected), rejected=()) for enc in encoded]
    doubled = collate([(enc, 0) for enc in all_rows], pad_id)
    spec = TrainingSpec()

    def bond(model: Any) -> Any:
        return bond_step_loss(model, bond_batch, spec).total

    model = _model(model_dir)
    bond_first = _median_step(model, bond, args.steps)
    plain = _median_step(_model(model_dir), lambda m: sft_loss(m, chosen_only), args.steps)
    plain_doubled = _median_step(_model(model_dir), lambda m: sft_loss(m, doubled), args.steps)
    reference = _median_reference_forward(_model(model_dir), bond_batch, args.steps)
    bond_second = _median_step(_model(model_dir), bond, args.steps)
    bond_s = min(bond_first, bond_second)
    physical = plain_doubled + reference

    trl_rows = [
        {"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)}
        for enc in encoded
        for ids, n_prompt in enc.chosen
    ]
    trl, trl_profile = _trl(model_dir, trl_rows, args.steps)
    trl_fp32, _ = _trl(model_dir, trl_rows, args.steps, bf16=False)
    trl_fp32_unchecked, _ = _trl(model_dir, trl_rows, args.steps, bf16=False, gradient_checkpointing=False)

    ms = {k: round(v * 1000, 2) for k, v in {
        "bond": bond_s, "plain_sft": plain, "plain_sft_doubled": plain_doubled,
        "reference_forward": reference, "physical_estimate": physical, "trl_sft": trl,
        "trl_sft_fp32": trl_fp32, "trl_sft_fp32_without_checkpointing": trl_fp32_unchecked,
    }.items()}  # fmt: skip
    print(
        f"step ms: BOND {ms['bond']} ({bond_first * 1000:.1f} / {bond_second * 1000:.1f}) | plain SFT "
        f"{ms['plain_sft']} | physical estimate {ms['physical_estimate']} (plain SFT on both rows "
        f"{ms['plain_sft_doubled']} + reference forward {ms['reference_forward']}) | TRL SFT {ms['trl_sft']} "
        f"({ms['trl_sft_fp32']} with bf16=False, {ms['trl_sft_fp32_without_checkpointing']} with bf16=False "
        "and gradient_checkpointing=False)"
    )
    slowest = max(trl_profile, key=lambda k: trl_profile[k])
    print(f"TRL's profiled time by part: {trl_profile}; largest: {slowest}")
    finish(
        "bond_step",
        [
            ratio("BOND step / physical estimate", bond_s / physical, "<= 1.3"),
            ratio("BOND step / plain SFT step (chosen rows)", bond_s / plain, "<= 3.5"),
            ratio("TRL SFT step / plain SFT step", trl / plain),
            ratio("same, TRL with bf16=False", trl_fp32 / plain),
            ratio("same, TRL with bf16=False, gradient_checkpointing=False", trl_fp32_unchecked / plain),
        ],
        machine,
        step_ms=ms,
        trl_profile=trl_profile,
        trl_largest_part=slowest,
        cpu_bf16_instructions=cpu_bf16_instructions(),
        prompts=args.prompts,
        bond_sequences=int(bond_batch.input_ids.shape[0]),
        sft_sequences=int(chosen_only.input_ids.shape[0]),
        tokens_per_sequence=int(bond_batch.input_ids.shape[1]),
        torch_threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()
