"""How the train stage turns curated rows into BOND batches: masks, pairs, truncation, order."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubedistill.api.models import TrainingSpec
from kubedistill.local.tiny_model import tiny_llama
from kubedistill_trainer.bond import bond_loss
from kubedistill_trainer.train import bond_step_loss, first_response_label
from kubedistill_trainer.train_data import (
    Encoded,
    collate,
    encode_pair,
    micro_batch_members,
    parse_curated,
)

MESSAGES = [{"role": "user", "content": "What is 2 plus 2?"}]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama())


def test_chat_template_prompt_is_masked_and_answer_kept(tokenizer: Any) -> None:
    ids, n_prompt = encode_pair(tokenizer, MESSAGES, "The answer is 4.", 256)
    assert tokenizer.decode(ids[:n_prompt]) == "<s>### user:\nWhat is 2 plus 2?</s>\n### assistant:\n"
    assert tokenizer.decode(ids[n_prompt:]) == "The answer is 4.</s>\n"


def test_without_chat_template_a_plain_format_ends_with_eos(tokenizer: Any) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ids, n_prompt = encode_pair(plain, MESSAGES, "Four.", 256)
    assert tokenizer.decode(ids[:n_prompt]) == "What is 2 plus 2?\n\n"
    assert tokenizer.decode(ids[n_prompt:]) == "Four.</s>"
    assert ids[-1] == tokenizer.eos_token_id


def test_long_prompts_are_cut_from_the_left_keeping_room_for_the_answer(tokenizer: Any) -> None:
    long = [{"role": "user", "content": "blah " * 200 + "the end?"}]
    answer = "yes " * 100
    ids, n_prompt = encode_pair(tokenizer, long, answer, 64)
    assert len(ids) == 64
    assert n_prompt == 32  # half the room goes to the answer
    assert tokenizer.decode(ids[:n_prompt]).endswith("the end?</s>\n### assistant:\n")
    assert tokenizer.decode(ids[n_prompt:]).startswith("yes yes")


def test_collate_aligns_response_mask_with_labels_and_pairs_within_a_prompt() -> None:
    a = Encoded(chosen=(([1, 10, 11, 12], 2), ([1, 10, 13], 2)), rejected=(([1, 10, 14, 15, 16], 2),))
    b = Encoded(chosen=(([1, 20, 21], 2),), rejected=())
    batch = collate([(a, 0), (b, 0)], pad_id=0)
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 12, 0],
        [1, 10, 13, 0, 0],
        [1, 10, 14, 15, 16],
        [1, 20, 21, 0, 0],
    ]
    assert batch.is_chosen.tolist() == [True, True, False, True]
    assert batch.pairs.tolist() == [[0, 2], [1, 2]]  # prompt b has no rejected answer: no pair
    labels = batch.input_ids[:, 1:]
    answers = [labels[r][batch.response_mask[r].bool()].tolist() for r in range(4)]
    assert answers == [[11, 12], [13], [14, 15, 16], [21]]
    assert batch.tokens == 4 + 3 + 5 + 3


def test_rejected_answers_rotate_by_epoch() -> None:
    enc = Encoded(chosen=(([1, 2, 3], 1),), rejected=(([1, 2, 4], 1), ([1, 2, 5], 1), ([1, 2, 6], 1)))
    picked = [collate([(enc, epoch)], pad_id=0).input_ids[1, -1].item() for epoch in range(4)]
    assert picked == [4, 5, 6, 4]


def test_micro_batches_cover_every_example_once_per_epoch_deterministically() -> None:
    n, size = 7, 3
    members = [m for i in range(7) for m in micro_batch_members(i, size, n)]  # 21 = three epochs
    for epoch in range(3):
        assert Counter(e for e, ep in members if ep == epoch) == Counter(range(n))
    assert micro_batch_members(5, size, n) == micro_batch_members(5, size, n)
    first_epoch = [e for e, ep in members if ep == 0]
    assert first_epoch != list(range(n))  # shuffled


def test_parse_curated_accepts_strings_and_objects_and_skips_rows_without_chosen() -> None:
    rows = [
        {"id": "a", "prompt": "p", "chosen": ["x", {"text": "y"}], "rejected": [{"text": "z"}, ""]},
        {"id": "b", "messages": [{"role": "user", "content": "q"}], "chosen": [], "rejected": ["w"]},
        {"id": "c", "prompt": "r", "system": "be brief", "chosen": ["v"]},
    ]
    examples = parse_curated(rows)
    assert [e.id for e in examples] == ["a", "c"]
    assert examples[0].chosen == ("x", "y") and examples[0].rejected == ("z",)
    assert examples[1].messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "r"},
    ]
    assert examples[1].rejected == ()


def test_collate_of_one_sequence_has_no_pairs() -> None:
    batch = collate([(Encoded(chosen=(([1, 2], 1),), rejected=()), 0)], pad_id=0)
    assert batch.pairs.shape == (0, 2) and batch.pairs.dtype == torch.long


def test_trimmed_logits_give_the_same_loss_as_full_logits() -> None:
    """bond_step_loss skips the LM head on the shared prompt prefix; the loss must not notice."""
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    a = Encoded(chosen=(([1, 5, 6, 7, 8, 9, 10], 4),), rejected=(([1, 5, 6, 7, 11, 12], 4),))
    b = Encoded(chosen=(([1, 5, 6, 7, 8, 13, 14, 15], 5),), rejected=())
    batch = collate([(a, 0), (b, 0)], pad_id=0)
    assert first_response_label(batch) == 3
    spec = TrainingSpec(bond_beta=0.5, bond_gamma=0.3)
    trimmed = bond_step_loss(model, batch, spec)
    with torch.no_grad():
        policy = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        with model.disable_adapter():
            ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    full = bond_loss(
        policy,
        ref,
        batch.input_ids[:, 1:],
        batch.response_mask,
        batch.is_chosen,
        batch.pairs,
        beta=0.5,
        gamma=0.3,
        tau=spec.preference_scale,
    )
    for got, want in zip(trimmed.as_floats().values(), full.as_floats().values(), strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert full.kl.item() > 0 and full.pref.item() != pytest.approx(0.6931, abs=1e-4)
