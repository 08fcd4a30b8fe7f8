"""The prompts of one generate attempt: one streaming pass over the dataset validates it (the
estimate's invalid-share rule), writes `dataset/{train,test,rejected}.jsonl` (and, from recorded traffic,
`traffic-rejected.jsonl`: the objects refused and why) and a local work file of the prompts still to
ask, which the teacher calls then read line by line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubedistill import dataset, store
from kubedistill.api.models import TrafficCounts
from kubedistill.api.stage import StageInvocation
from kubedistill.catalog import ResolvedTeacher
from kubedistill.traffic import TrafficStream, write_rejections
from kubedistill_trainer.shards import Work
from kubedistill_trainer.teacher import estimate_tokens


@dataclass
class Prepared:
    """The dataset as this attempt stages it: counts, and a local file of the prompts still to ask."""

    work_path: Path
    train: int = 0
    test: int = 0
    rejected: int = 0
    # The prompts this pod asks for (all of them unless the stage is sharded), and of those the answered.
    total: int = 0
    done: int = 0
    longest_request_tokens: int = 0
    traffic: TrafficCounts | None = None

    @property
    def prompts(self) -> int:
        return self.train + self.test

    @property
    def to_ask(self) -> int:
        return self.total - self.done

    def works(self) -> Iterator[Work]:
        with self.work_path.open(encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                yield Work(dataset.row_from_obj(obj), obj["split"])


def _jsonl(f: Any, obj: Any) -> None:
    f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def prepare_dataset(
    inv: StageInvocation,
    stage_uri: str,
    directory: Path,
    done: dataset.SeenIds,
    teacher: ResolvedTeacher,
    owns: Callable[[str], bool] | None = None,
) -> Prepared:
    """One streaming pass over the dataset: validate (DatasetInvalid past the invalid share), split
    by id, write `dataset/{train,test,rejected}.jsonl` (whole, in every shard), and list the prompts
    this pod `owns` (all by default) that are not answered yet."""
    spec = inv.spec
    gen = spec.generation
    examples = gen.few_shot_turns()
    raw, _ = dataset.open_source(spec.dataset)
    lines = dataset.decode_lines(raw, dataset.describe(spec.dataset))
    prepared = Prepared(directory / "work.jsonl")
    outputs = {name: directory / f"{name}.jsonl" for name in ("train", "test", "rejected")}
    valid, first_rejected = 0, None
    with contextlib.ExitStack() as stack:
        files = {
            name: stack.enter_context(path.open("w", encoding="utf-8")) for name, path in outputs.items()
        }
        work = stack.enter_context(prepared.work_path.open("w", encoding="utf-8"))
        for item in dataset.iter_parsed(lines):
            if isinstance(item, dataset.Rejected):
                prepared.rejected += 1
                first_rejected = first_rejected or dataset.Rejected(item.line, item.reason, "")
                _jsonl(files["rejected"], item.to_json())
                continue
            valid += 1
            if spec.dataset.num_prompts is not None and valid > spec.dataset.num_prompts:
                continue
            split = "test" if dataset.is_test(item.id, spec.dataset.test_fraction) else "train"
            _jsonl(files[split], item.to_json())
            setattr(prepared, split, getattr(prepared, split) + 1)
            if owns is not None and not owns(item.id):
                continue
            prepared.total += 1
            if item.id in done:
                prepared.done += 1
                continue
            _jsonl(work, {**item.to_json(), "split": split})
            tokens = estimate_tokens(
                item.teacher_messages(gen.system_prompt, examples), teacher.chars_per_token
            )
            prepared.longest_request_tokens = max(prepared.longest_request_tokens, tokens)
    if isinstance(raw, TrafficStream):
        prepared.traffic = raw.counts
        write_rejections(raw, directory / "traffic-rejected.jsonl")
        outputs["traffic-rejected"] = directory / "traffic-rejected.jsonl"
    problem = dataset.invalid_share_problem(valid, prepared.rejected, first_rejected)
    if problem is not None:
        raise dataset.DatasetInvalid(problem)
    for name, path in outputs.items():
        store.put_file(path, f"{stage_uri}/dataset/{name}.jsonl")
    return prepared
