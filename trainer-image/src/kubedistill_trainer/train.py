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
killed one would have seen next (the data side lives in train_data.py).

Across processes and nodes (distributed.py) the step stays the same `gradientAccumulation`
micro-batches, dealt out to the ranks; only rank 0 writes.

The curated file is downloaded once and indexed by line offset (8 bytes a prompt); a micro-batch
reads and tokenises only its own prompts, so memory does not grow with the number of prompts
(beyond the index and one epoch's shuffle) and a short run does not tokenise a large dataset.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubedistill import store
from kubedistill.api.models import Artifacts, Metrics, Stage, TrainingSpec
from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill_trainer import distributed, models
from kubedistill_trainer.checkpoints import TrainState, load_checkpoint, save_checkpoint
from kubedistill_trainer.runtime import ProgressReporter, StageFailure
from kubedistill_trainer.train_data import (
    SEED,
    Batch,
    CuratedFile,
    Example,
    collate,
    encode_example,
    micro_batch_members,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CURATED_FILE = "curated/train.jsonl"
MAX_GRAD_NORM = 1.0
# Unsloth needs explicit module names where PEFT accepts "all-linear".
_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------- model


def use_unsloth(distributed_run: bool) -> bool:
    """Unsloth on one CUDA device when installed; its open-source build does not run under DDP."""
    return models.unsloth_available() and not distributed_run


def load_trainable(
    inv: StageInvocation, *, distributed_run: bool = False
) -> tuple[Any, PreTrainedTokenizerBase, str]:
    """The student with fresh LoRA adapters: Unsloth (see `use_unsloth`), else transformers + PEFT."""
    import torch

    spec = inv.spec.training
    source = models.resolve_student(inv.spec.student.model)
    targets = models.lora_targets(inv.spec.student.model, spec.lora.target_modules)
    torch.manual_seed(SEED)
    if use_unsloth(distributed_run) and not source.gguf_file:  # Unsloth loads no GGUF
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


def bond_step_loss(model: Any, batch: Batch, spec: TrainingSpec, policy: Any = None) -> Any:
    """Forward the policy (with grad) and the reference (adapters off, no grad); return the BondLoss.

    `policy` is what the policy forward runs through (the DDP wrapper of `model` across ranks, so
    its backward is the one that synchronises gradients); the reference needs no gradient, so it
    runs on `model` itself.
    """
    import torch

    from kubedistill_trainer.bond import bond_loss

    dev = next(model.parameters()).device
    ids, attention = batch.input_ids.to(dev), batch.attention_mask.to(dev)
    start = first_response_label(batch)
    policy_logits = _logits_from(model if policy is None else policy, ids, attention, start)
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


_PARTS = ("loss", "sft", "pref", "kl")


def _steps(
    model: Any,
    policy: Any,
    examples: Sequence[Example] | CuratedFile,
    tokenizer: PreTrainedTokenizerBase,
    spec: TrainingSpec,
    state: TrainState,
    world: distributed.World,
) -> Iterator[tuple[dict[str, float], int]]:
    """Per optimiser step: backpropagate this rank's share of the step's micro-batches; yield the
    step's mean loss parts and its tokens, over all ranks.

    Gradients are synchronised once a step, on this rank's last backward (`no_sync` before it).
    """
    import contextlib

    pad_id = int(tokenizer.pad_token_id)
    mine = distributed.micro_batches_of(world.rank, world.size, spec.gradient_accumulation)
    scale = world.size / spec.gradient_accumulation
    for step in range(state.step, spec.steps):
        sums, tokens = [0.0] * len(_PARTS), 0
        for n, micro in enumerate(mine):
            members = micro_batch_members(
                step * spec.gradient_accumulation + micro, spec.batch_size, len(examples)
            )
            encoded = [
                (encode_example(tokenizer, examples[i], spec.max_seq_length), epoch) for i, epoch in members
            ]
            batch = collate(encoded, pad_id)
            last = n == len(mine) - 1
            sync = contextlib.nullcontext() if last or not world.distributed else policy.no_sync()
            with sync:
                loss = bond_step_loss(model, batch, spec, policy)
                (loss.total * scale).backward()
            parts = loss.as_floats()
            sums = [acc + parts[k] for acc, k in zip(sums, _PARTS, strict=True)]
            tokens += batch.tokens
        *totals, all_tokens = distributed.sum_across([*sums, tokens], world)
        yield (
            {k: v / spec.gradient_accumulation for k, v in zip(_PARTS, totals, strict=True)},
            int(all_tokens),
        )


def run(inv: StageInvocation) -> StageResult:
    world = distributed.world()
    if use_unsloth(world.distributed):
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
            distributed.check_world(world, inv.spec.training.gradient_accumulation)
            distributed.start(world)
            try:
                return _train(inv, examples, world)
            finally:
                distributed.stop(world)
        finally:
            examples.close()


def _train(inv: StageInvocation, examples: CuratedFile, world: distributed.World) -> StageResult:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    spec = inv.spec.training
    stage_uri = inv.stage_uri()

    progress = ProgressReporter(stage_uri, Stage.TRAIN) if world.primary else None
    if progress is not None:
        progress.update(0, spec.steps, detail="loading the student", force=True)
    model, tokenizer, backend = load_trainable(inv, distributed_run=world.distributed)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate)
    warmup = math.ceil(spec.warmup_ratio * spec.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, spec.steps)
    # Every rank loads the same checkpoint (whatever world size wrote it: the optimiser state is the
    # same on every rank, and the data order is a function of the step alone).
    state = load_checkpoint(stage_uri, model, optimizer, scheduler) or TrainState(history=[])
    if world.rank:
        # Dropout on the other ranks draws its own stream; rank 0's is the one checkpointed.
        torch.manual_seed(SEED + 7919 * world.rank + state.step)
    policy = distributed.wrap(model, world)
    resumed_from = state.step
    history = state.history if state.history is not None else []
    if resumed_from:
        log.info("resuming from the checkpoint at step %d", resumed_from)

    started = time.monotonic()
    attempt_tokens = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parts, tokens in _steps(model, policy, examples, tokenizer, spec, state, world):
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        attempt_tokens += tokens
        history.append({"step": state.step, **parts, "lr": scheduler.get_last_lr()[0]})
        done = state.step == spec.steps
        at_checkpoint = state.step % spec.checkpoint_every == 0 or done
        if progress is not None:
            detail = f"step {state.step}/{spec.steps} " + " ".join(f"{k}={v:.4f}" for k, v in parts.items())
            progress.update(state.step, spec.steps, detail=detail, loss=parts["loss"], force=at_checkpoint)
        if at_checkpoint:
            state.elapsed += time.monotonic() - started
            state.tokens += attempt_tokens
            started, attempt_tokens = time.monotonic(), 0
            state.history = history
            if world.primary:
                save_checkpoint(stage_uri, model, optimizer, scheduler, state)
                store.write_jsonl(f"{stage_uri}/losses.jsonl", history)

    adapter_uri = f"{stage_uri}/adapter"
    if world.primary:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            store.put_tree(tmp, adapter_uri)
    final = history[-1] if history else {}
    return StageResult(
        stage=Stage.TRAIN,
        ok=True,
        message=f"{spec.steps} steps on {len(examples)} prompts ({backend}"
        + (f", {world.size} processes)" if world.distributed else ")"),
        metrics=Metrics(student_loss_final=final.get("loss"), training_time_sec=round(state.elapsed, 3)),
        artifacts=Artifacts(adapter_uri=adapter_uri),
        details={
            # Over all attempts: a resumed run's figure still describes the whole training.
            "tokensPerSecond": round(state.tokens / max(state.elapsed, 1e-9), 1),
            "steps": state.step,
            "resumedFromStep": resumed_from,
            "backend": backend,
            "device": models.device(),
            "worldSize": world.size,
            "prompts": len(examples),
            "promptsWithRejected": examples.with_rejected,
            "lossParts": {k: final[k] for k in ("loss", "sft", "pref", "kl") if k in final},
            "lossesURI": f"{stage_uri}/losses.jsonl",
        },
    )
