"""The train stage: LoRA on the student with the BOND loss (DESIGN §4), resumable from checkpoints.

In:  `<base>/curate/curated/train.jsonl`, rows `{id, prompt|messages, system?, chosen: [..], rejected: [..]}`
     (a candidate is a string or an object with `text`).
Out: `<base>/train/adapter/` (PEFT adapter + tokenizer), `<base>/train/losses.jsonl` (per step:
     loss, sft, pref, kl, lr), `<base>/train/checkpoints/` (every `checkpointEvery` steps and at the
     end: adapter, optimiser, scheduler, step, RNG; `latest.json` points at the newest complete one).

A micro-batch holds `batchSize` prompts with their chosen answers and as many rejected ones (rotated
per epoch), all in one padded batch; pairs are chosen × rejected of the same prompt. The reference
policy is the same model with its adapters disabled, under no_grad. Which prompts form which
micro-batch is a pure function of the micro-batch index, so a resumed run sees exactly the data the
killed one would have seen next.

The curated file is downloaded once and indexed by line offset (8 bytes a prompt); a micro-batch
reads and tokenises only its own prompts, so memory does not grow with the number of prompts
(beyond the index and one epoch's shuffle) and a short run does not tokenise a large dataset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubedistill import store
from kubedistill.api.models import Artifacts, Metrics, Stage, TrainingSpec
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill.dataset import row_from_obj
from kubedistill_trainer import models
from kubedistill_trainer.checkpoints import TrainState, load_checkpoint, save_checkpoint
from kubedistill_trainer.runtime import ProgressReporter, StageFailure

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SEED = 17
CURATED_FILE = "curated/train.jsonl"
MAX_GRAD_NORM = 1.0
# Unsloth needs explicit module names where PEFT accepts "all-linear".
_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Example:
    id: str
    messages: list[dict[str, str]]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]


@dataclass(frozen=True)
class Encoded:
    """Token ids of each candidate sequence (prompt + answer) and how many leading ids are prompt."""

    chosen: tuple[tuple[list[int], int], ...]
    rejected: tuple[tuple[list[int], int], ...]


def _texts(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else []
    texts = (item.get("text") if isinstance(item, dict) else item for item in items)
    return tuple(t for t in texts if isinstance(t, str) and t.strip())


def example_of(obj: Any) -> Example | None:
    """A curated row as an example; None for a row without a chosen answer, which teaches nothing."""
    chosen = _texts(obj.get("chosen"))
    if not chosen:
        return None
    row = row_from_obj(obj)
    return Example(row.id, row.student_messages(), chosen, _texts(obj.get("rejected")))


def parse_curated(objs: Sequence[Any]) -> list[Example]:
    """Curated rows → examples; rows without a chosen answer are left out."""
    return [e for e in (example_of(o) for o in objs) if e is not None]


class CuratedFile:
    """The examples of a local curated JSONL file, read by index: only their line offsets are held."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets = array("Q")
        self.with_rejected = 0
        with path.open("rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    example = example_of(json.loads(line))
                    if example is not None:
                        self._offsets.append(offset)
                        self.with_rejected += bool(example.rejected)
                offset += len(line)
        self._file = path.open("rb")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Example:
        self._file.seek(self._offsets[index])
        example = example_of(json.loads(self._file.readline()))
        assert example is not None
        return example

    def close(self) -> None:
        self._file.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], answer: str, max_len: int
) -> tuple[list[int], int]:
    """(ids, prompt length) of prompt + answer, the prompt cut from the left so half the room stays for the answer."""
    prompt_ids = tokenizer(models.render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(models.render_conversation(tokenizer, messages, answer), add_special_tokens=False)[
        "input_ids"
    ]
    # A template may tokenise the boundary differently once the answer follows; mask what is shared.
    n_prompt = _common_prefix(prompt_ids, full_ids)
    answer_ids = full_ids[n_prompt:]
    keep_prompt = max(1, max_len - min(len(answer_ids), max_len // 2))
    prompt_part = full_ids[:n_prompt][-keep_prompt:]
    return (prompt_part + answer_ids)[:max_len], len(prompt_part)


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int) -> Encoded:
    def enc(answers: tuple[str, ...]) -> tuple[tuple[list[int], int], ...]:
        return tuple(encode_pair(tokenizer, example.messages, a, max_len) for a in answers)

    return Encoded(chosen=enc(example.chosen), rejected=enc(example.rejected))


@lru_cache(maxsize=2)
def epoch_order(epoch: int, n_examples: int) -> array[int]:
    """The seeded shuffle of one epoch, 4 bytes a prompt (made once, not once per example)."""
    return array("L", random.Random(SEED + epoch).sample(range(n_examples), n_examples))


def micro_batch_members(index: int, batch_size: int, n_examples: int) -> list[tuple[int, int]]:
    """(example, epoch) of micro-batch `index`: consecutive slices of a per-epoch seeded shuffle."""
    members = []
    for flat in range(index * batch_size, (index + 1) * batch_size):
        epoch, pos = divmod(flat, n_examples)
        members.append((epoch_order(epoch, n_examples)[pos], epoch))
    return members


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T-1], aligned with labels = input_ids[:, 1:]
    is_chosen: torch.Tensor  # [B]
    pairs: torch.Tensor  # [P, 2]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(encoded: Sequence[tuple[Encoded, int]], pad_id: int) -> Batch:
    """One padded batch of every prompt's chosen sequences and `len(chosen)` rejected ones (rotated by epoch)."""
    import torch

    seqs: list[tuple[list[int], int]] = []
    chosen_flags: list[bool] = []
    pairs: list[tuple[int, int]] = []
    for enc, epoch in encoded:
        chosen_rows = list(range(len(seqs), len(seqs) + len(enc.chosen)))
        seqs.extend(enc.chosen)
        chosen_flags.extend([True] * len(enc.chosen))
        if enc.rejected:
            take = min(len(enc.chosen), len(enc.rejected))
            start = epoch * take
            picked = [enc.rejected[(start + i) % len(enc.rejected)] for i in range(take)]
            rejected_rows = list(range(len(seqs), len(seqs) + take))
            seqs.extend(picked)
            chosen_flags.extend([False] * take)
            pairs.extend((c, r) for c in chosen_rows for r in rejected_rows)
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width - 1), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, : len(ids)] = 1
        # Label position t predicts token t+1: answer tokens are labels n_prompt-1 .. len-2.
        response[row, max(n_prompt - 1, 0) : len(ids) - 1] = 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response,
        is_chosen=torch.tensor(chosen_flags, dtype=torch.bool),
        pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
    )


# ---------------------------------------------------------------------------------------- model


def load_trainable(inv: StageInvocation) -> tuple[Any, PreTrainedTokenizerBase, str]:
    """The student with fresh LoRA adapters: Unsloth on CUDA when installed, else transformers + PEFT."""
    import torch

    spec = inv.spec.training
    source = models.resolve_student(inv.spec.student.model)
    targets = models.lora_targets(inv.spec.student.model, spec.lora.target_modules)
    torch.manual_seed(SEED)
    if models.unsloth_available() and not source.gguf_file:  # Unsloth loads no GGUF
        os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=source.path,
            max_seq_length=spec.max_seq_length,
            dtype=torch.bfloat16,
            load_in_4bit=False,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=targets if isinstance(targets, list) else list(_DEFAULT_TARGETS),
            use_gradient_checkpointing="unsloth",
            random_state=SEED,
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, "unsloth"
    from peft import LoraConfig, get_peft_model

    tokenizer = models.load_tokenizer(source)
    base = models.load_causal_lm(source)
    config = LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config), tokenizer, "transformers+peft"


def first_response_label(batch: Batch) -> int:
    """The first label position any row trains on: logits before it are never needed."""
    used = batch.response_mask.any(dim=0).nonzero()
    return int(used[0]) if len(used) else 0


def _logits_from(model: Any, ids: Any, attention: Any, start: int) -> Any:
    """Logits predicting labels start.. (= tokens start+1..): [B, T-1-start, V].

    `logits_to_keep` spares the LM head — and the largest activation of the step — on the shared
    prompt prefix; slicing again keeps this right for a model that ignores the argument.
    """
    keep = ids.shape[1] - start
    return model(input_ids=ids, attention_mask=attention, logits_to_keep=keep).logits[:, -keep:][:, :-1]


def bond_step_loss(model: Any, batch: Batch, spec: TrainingSpec) -> Any:
    """Forward the policy (with grad) and the reference (adapters off, no grad); return the BondLoss."""
    import torch

    from kubedistill_trainer.bond import bond_loss

    dev = next(model.parameters()).device
    ids, attention = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    start = first_response_label(batch)
    policy_logits = _logits_from(model, ids, attention, start)
    with torch.no_grad(), model.disable_adapter():
        ref_logits = _logits_from(model, ids, attention, start)
    return bond_loss(
        policy_logits,
        ref_logits,
        ids[:, start + 1 :],
        batch.response_mask[:, start:].to(dev),
        batch.is_chosen.to(dev),
        batch.pairs.to(dev),
        beta=spec.bond_beta,
        gamma=spec.bond_gamma,
        tau=spec.preference_scale,
    )


# -------------------------------------------------------------------------------------------- run


def _mean_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def _steps(
    model: Any,
    examples: Sequence[Example] | CuratedFile,
    tokenizer: PreTrainedTokenizerBase,
    spec: TrainingSpec,
    state: TrainState,
) -> Iterator[tuple[dict[str, float], int]]:
    """Per optimiser step: backpropagate each accumulated micro-batch; yield mean loss parts and tokens."""
    pad_id = int(tokenizer.pad_token_id)
    for step in range(state.step, spec.steps):
        parts, tokens = [], 0
        for micro in range(spec.gradient_accumulation):
            members = micro_batch_members(
                step * spec.gradient_accumulation + micro, spec.batch_size, len(examples)
            )
            encoded = [
                (encode_example(tokenizer, examples[i], spec.max_seq_length), epoch) for i, epoch in members
            ]
            batch = collate(encoded, pad_id)
            loss = bond_step_loss(model, batch, spec)
            (loss.total / spec.gradient_accumulation).backward()
            parts.append(loss.as_floats())
            tokens += batch.tokens
        yield _mean_parts(parts), tokens


def run(inv: StageInvocation) -> StageResult:
    if models.unsloth_available():
        import unsloth  # noqa: F401  # it patches transformers, so it must be imported first

    curated_uri = f"{inv.stage_uri(Stage.CURATE)}/{CURATED_FILE}"
    with tempfile.TemporaryDirectory(prefix="train-data-") as tmp:
        local = Path(tmp) / "train.jsonl"
        try:
            store.get_file(curated_uri, local)
        except store.NotFound as exc:
            raise StageFailure("MissingInput", f"no curated data at {curated_uri}: run curate first") from exc
        examples = CuratedFile(local)
        try:
            if not len(examples):
                raise StageFailure("NoTrainingData", f"{curated_uri} has no prompt with a chosen answer")
            return _train(inv, examples)
        finally:
            examples.close()


def _train(inv: StageInvocation, examples: CuratedFile) -> StageResult:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    spec = inv.spec.training
    stage_uri = inv.stage_uri()

    progress = ProgressReporter(stage_uri, Stage.TRAIN)
    progress.update(0, spec.steps, detail="loading the student", force=True)
    model, tokenizer, backend = load_trainable(inv)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate)
    warmup = math.ceil(spec.warmup_ratio * spec.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, spec.steps)
    state = load_checkpoint(stage_uri, model, optimizer, scheduler) or TrainState(history=[])
    resumed_from = state.step
    history = state.history if state.history is not None else []
    if resumed_from:
        log.info("resuming from the checkpoint at step %d", resumed_from)

    started = time.monotonic()
    attempt_tokens = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parts, tokens in _steps(model, examples, tokenizer, spec, state):
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        attempt_tokens += tokens
        history.append({"step": state.step, **parts, "lr": scheduler.get_last_lr()[0]})
        done = state.step == spec.steps
        at_checkpoint = state.step % spec.checkpoint_every == 0 or done
        detail = f"step {state.step}/{spec.steps} " + " ".join(f"{k}={v:.4f}" for k, v in parts.items())
        progress.update(state.step, spec.steps, detail=detail, loss=parts["loss"], force=at_checkpoint)
        if at_checkpoint:
            state.elapsed += time.monotonic() - started
            state.tokens += attempt_tokens
            started, attempt_tokens = time.monotonic(), 0
            state.history = history
            save_checkpoint(stage_uri, model, optimizer, scheduler, state)
            store.write_jsonl(f"{stage_uri}/losses.jsonl", history)

    adapter_uri = f"{stage_uri}/adapter"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        store.put_tree(tmp, adapter_uri)
    final = history[-1] if history else {}
    return StageResult(
        stage=Stage.TRAIN,
        ok=True,
        message=f"{spec.steps} steps on {len(examples)} prompts ({backend})",
        metrics=Metrics(student_loss_final=final.get("loss"), training_time_sec=round(state.elapsed, 3)),
        artifacts=Artifacts(adapter_uri=adapter_uri),
        details={
            # Over all attempts: a resumed run's figure still describes the whole training.
            "tokensPerSecond": round(state.tokens / max(state.elapsed, 1e-9), 1),
            "steps": state.step,
            "resumedFromStep": resumed_from,
            "backend": backend,
            "device": models.device(),
            "prompts": len(examples),
            "promptsWithRejected": examples.with_rejected,
            "lossParts": {k: final[k] for k in ("loss", "sft", "pref", "kl") if k in final},
            "lossesURI": f"{stage_uri}/losses.jsonl",
        },
    )
