"""Benchmark: one BOND optimiser step vs one TRL SFTTrainer step, same tiny model, same prompts.

Both sides train the same LoRA (r 16, all projections) on the tiny random Llama with AdamW. The
batch is P prompts, each with one chosen and one rejected answer: SFT sees the P chosen sequences
(what plain SFT would train on), BOND sees chosen + rejected in one padded batch plus the reference
forward pass with adapters off — roughly three forward passes' worth. Timings are medians over
`--steps` steps after warm-up; the BOND side is timed twice (before and after TRL) and the faster
median kept, so load from other processes on the machine hits both sides alike.

    python bench/bond_step.py [--prompts 4] [--steps 15]

Ends with one JSON line; `ratio` = BOND step time / SFT step time (target ≤ 3.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from kubedistill.api.models import TrainingSpec
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer.train import Example, bond_step_loss, collate, encode_example

WARMUP = 3


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


def _bond_median(model_dir: str, batch: Any, steps: int) -> float:
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), _lora())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    spec = TrainingSpec()
    times = []
    for i in range(WARMUP + steps):
        start = time.perf_counter()
        loss = bond_step_loss(model, batch(), spec)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class _StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def _sft_median(model_dir: str, rows: list[dict[str, list[int]]], steps: int) -> float:
    torch.manual_seed(0)
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=len(rows),
            max_steps=WARMUP + steps,
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
    return statistics.median(timer.times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()

    model_dir = str(tiny_llama())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    encoded = [encode_example(tokenizer, ex, 512) for ex in _examples(args.prompts)]
    sft_rows = [
        {"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)}
        for enc in encoded
        for ids, n_prompt in enc.chosen
    ]

    def batch() -> Any:
        return collate([(enc, 0) for enc in encoded], pad_id)

    bond_first = _bond_median(model_dir, batch, args.steps)
    sft = _sft_median(model_dir, sft_rows, args.steps)
    bond_second = _bond_median(model_dir, batch, args.steps)
    bond = min(bond_first, bond_second)
    sample = batch()
    print(
        f"BOND step {bond * 1000:.1f} ms ({bond_first * 1000:.1f} / {bond_second * 1000:.1f}), "
        f"TRL SFT step {sft * 1000:.1f} ms"
    )
    print(
        json.dumps(
            {
                "bench": "bond_step",
                "ratio": round(bond / sft, 3),
                "target": "<= 3.0",
                "bond_step_ms": round(bond * 1000, 2),
                "sft_step_ms": round(sft * 1000, 2),
                "prompts": args.prompts,
                "bond_sequences": int(sample.input_ids.shape[0]),
                "sft_sequences": len(sft_rows),
                "tokens_per_sequence": int(sample.input_ids.shape[1]),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
