"""The train stage's data: curated rows as examples, read by index, tokenised and collated into the
padded chosen/rejected batches the BOND loss takes (see train.py for the format and the guarantees).

Which prompts form which micro-batch is a pure function of the micro-batch index, so a resumed run,
and every rank of a distributed one, sees exactly the data a single unbroken process would.
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubedistill.dataset import row_from_obj
from kubedistill_trainer import models

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

SEED = 17


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
