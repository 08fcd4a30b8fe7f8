"""The cost and size estimate of a job, before it spends anything. One pure function, used by the
operator (status.estimate), the CLI (`kubedistill estimate`) and the SDK (`Distiller.estimate`).

    report = estimate(spec, rows, load_catalog(), tokenizer=None, measured_output_tokens=None)
    report.estimate            # the api model Estimate (status.estimate)
    report.breakdown           # how each figure was reached, for humans

A dataset too large to hold is streamed instead (`kubedistill.estimating`, the estimate stage): each
row goes into a `SampledTally`, and `estimate_from_tally` prices the sums.

- Input tokens are counted on the actual rows as the teacher will see them (teacher instruction +
  row system text + prompt or messages, plus the chat framing of 4 tokens a message and 2 a
  request): with `tokenizer` when given (anything with `encode(text)`, or a callable returning a
  count), else the teacher family's calibrated chars-per-token. A provider without `n` support is
  billed the input once per sample.
- Every row is counted exactly, unless counting is expensive (a tokenizer) and the dataset is large:
  then the first `exact_rows` rows are counted exactly and the rest estimated from a uniform random
  sample of them (reservoir sampling, seeded, so a rerun gives the same figure), scaled by their
  number; the breakdown says which, with the 95% margin of the input-token count.
- Cached input (`domain.pricing`): when the provider caches prompt prefixes by itself, all requests
  but the first read the prefix they share (teacher instruction, few-shot turns) from the cache,
  priced at the catalog's cached price. The prefix is narrowed row by row as the rows stream by, so
  only the prefix itself is kept. `teacher.mode` resolved to batch prices everything at the batch
  price. `mode: batch` for a provider without a batch API raises BatchUnsupported.
- Output tokens per sample are `measured_output_tokens` (the mean of earlier runs) when given, else
  `generation.maxTokens` — an upper bound.
- An `llm` judge costs one call per candidate: the question, the answer, the rubric and ~80 tokens
  of instruction in, ~40 tokens out.
- GPU minutes: the tokens training pushes through the student (steps × batch × accumulation ×
  sequence length; the preference term doubles the sequences, the reference pass adds a third)
  divided by the catalog's throughput for the student's size.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kubedistill.api.models import DistillationJobSpec, Estimate
from kubedistill.catalog import Catalog, ResolvedTeacher
from kubedistill.dataset import Row
from kubedistill.domain import pricing

MESSAGE_OVERHEAD = 4
REQUEST_OVERHEAD = 2
JUDGE_INSTRUCTION_TOKENS = 80
JUDGE_OUTPUT_TOKENS = 40
DEFAULT_STUDENT_PARAMS_B = 1.0
# z for a two-sided 95% interval.
Z95 = 1.96


class EstimateReport(NamedTuple):
    estimate: Estimate
    breakdown: dict[str, Any]


class _Counter:
    def __init__(self, tokenizer: Any, chars_per_token: float) -> None:
        self.tokenizer = tokenizer
        self.chars_per_token = chars_per_token

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return round(len(text) / self.chars_per_token)
        if hasattr(self.tokenizer, "encode"):
            return len(self.tokenizer.encode(text))
        return int(self.tokenizer(text))

    def chat(self, messages: Sequence[dict[str, str]]) -> int | None:
        """Tokens of the request as the tokenizer's chat template renders it, when it has one: exact
        for a teacher of the student's family, where the per-message overhead of the template (role
        markers, separators) would otherwise be guessed."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            return None
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def describe(self) -> str:
        return "tokenizer" if self.tokenizer is not None else f"{self.chars_per_token} chars/token"


def request_tokens(messages: Sequence[dict[str, str]], count: _Counter) -> int:
    rendered = count.chat(messages)
    if rendered is not None:
        return rendered
    return sum(count(m["content"]) + MESSAGE_OVERHEAD for m in messages) + REQUEST_OVERHEAD


def _judge_teacher(spec: DistillationJobSpec, catalog: Catalog) -> ResolvedTeacher | None:
    llm = spec.curation.judge.llm
    if llm is None:
        return None
    return catalog.resolve_teacher(llm.model or spec.teacher.model, llm.base_url or spec.teacher.base_url)


class RowTokens(NamedTuple):
    teacher: int
    """One request as the teacher gets it."""
    judge: int
    """The question (and reference) an `llm` judge is shown; 0 without one."""
    student: int
    """The prompt as the student sees it."""


class Counters:
    """The token counters of one job: the teacher's, the judge's and the student's."""

    def __init__(self, spec: DistillationJobSpec, catalog: Catalog, tokenizer: Any = None) -> None:
        self.spec = spec
        self.catalog = catalog
        self.teacher = catalog.resolve_teacher(spec.teacher.model, spec.teacher.base_url)
        self.judge = _judge_teacher(spec, catalog)
        self.student = catalog.student(spec.student.model)
        self.count = _Counter(tokenizer, self.teacher.chars_per_token)
        self.judge_count = _Counter(tokenizer, self.judge.chars_per_token) if self.judge else None
        self.student_count = _Counter(
            tokenizer, self.student.chars_per_token if self.student else self.teacher.chars_per_token
        )
        self._examples = spec.generation.few_shot_turns()

    @property
    def exact_is_cheap(self) -> bool:
        """Characters per token cost next to nothing a row; a tokenizer (and its chat template) does not."""
        return self.count.tokenizer is None

    def teacher_messages(self, row: Row) -> list[dict[str, str]]:
        return row.teacher_messages(self.spec.generation.system_prompt, self._examples)

    def row(self, row: Row) -> RowTokens:
        judge = 0
        if self.judge_count is not None:
            judge = self.judge_count(row.prompt_text()) + (
                self.judge_count(row.reference) if row.reference else 0
            )
        return RowTokens(
            teacher=request_tokens(self.teacher_messages(row), self.count),
            judge=judge,
            student=request_tokens(row.student_messages(), self.student_count),
        )


@dataclass(frozen=True)
class TokenTally:
    """Token sums over the rows a job takes: exact, or estimated from a sample."""

    rows: int = 0
    teacher: float = 0.0
    judge: float = 0.0
    student: float = 0.0
    counted: int = 0
    """Rows whose tokens were counted (all of them when exact)."""
    teacher_margin95: float = 0.0
    """Half-width of the 95% interval of `teacher` (0 when exact)."""
    prefix_tokens: int = 0
    """Tokens of the messages every request starts with (what a provider's prompt cache serves)."""

    @property
    def exact(self) -> bool:
        return self.counted == self.rows


def exact_tally(rows: Iterable[Row], counters: Counters) -> TokenTally:
    tally = SampledTally(counters, exact_rows=None)
    for row in rows:
        tally.add(row)
    return tally.result()


@dataclass
class SampledTally:
    """A streaming `TokenTally` in bounded memory: the first `exact_rows` rows (every row when None)
    are counted as they come; of the rest, a uniform random sample of `sample_rows` is kept
    (Algorithm R) and counted at the end, its mean scaled by how many rows it stands for."""

    counters: Counters
    exact_rows: int | None
    sample_rows: int = 2000
    seed: int = 0
    _rows: int = 0
    _sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    _rest: int = 0
    _sample: list[Row] = field(default_factory=list)
    _prefix: list[dict[str, str]] | None = None
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def add(self, row: Row) -> None:
        self._rows += 1
        self._prefix = pricing.narrow_prefix(self._prefix, self.counters.teacher_messages(row))
        if self.exact_rows is None or self._rows <= self.exact_rows:
            for i, value in enumerate(self.counters.row(row)):
                self._sums[i] += value
            return
        self._rest += 1
        if len(self._sample) < self.sample_rows:
            self._sample.append(row)
            return
        slot = self._rng.randrange(self._rest)
        if slot < self.sample_rows:
            self._sample[slot] = row

    def result(self) -> TokenTally:
        counted = [self.counters.row(r) for r in self._sample]
        k, rest = len(counted), self._rest
        totals = [float(s) for s in self._sums]
        margin = 0.0
        if k:
            scale = rest / k
            for i in range(3):
                totals[i] += scale * sum(c[i] for c in counted)
            margin = _margin95([c.teacher for c in counted], rest)
        return TokenTally(
            rows=self._rows,
            teacher=totals[0],
            judge=totals[1],
            student=totals[2],
            counted=self._rows - rest + k,
            teacher_margin95=margin,
            prefix_tokens=sum(
                self.counters.count(m["content"]) + MESSAGE_OVERHEAD for m in self._prefix or []
            ),
        )


def _margin95(sample: Sequence[int], population: int) -> float:
    """95% half-width of the estimated total of `population` values from a simple random `sample`,
    with the finite-population correction (0 when the sample is the population)."""
    k = len(sample)
    if k < 2 or population <= k:
        return 0.0
    mean = sum(sample) / k
    variance = sum((x - mean) ** 2 for x in sample) / (k - 1)
    correction = (population - k) / (population - 1)
    return Z95 * population * math.sqrt(variance / k * correction)


def estimate(
    spec: DistillationJobSpec,
    rows: Sequence[Row],
    catalog: Catalog,
    tokenizer: Any = None,
    measured_output_tokens: float | None = None,
) -> EstimateReport:
    rows = rows[: spec.dataset.num_prompts] if spec.dataset.num_prompts else rows
    counters = Counters(spec, catalog, tokenizer)
    return estimate_from_tally(spec, exact_tally(rows, counters), counters, measured_output_tokens)


def estimate_from_tally(
    spec: DistillationJobSpec,
    tally: TokenTally,
    counters: Counters,
    measured_output_tokens: float | None = None,
) -> EstimateReport:
    gen = spec.generation
    teacher = counters.teacher
    prompts = tally.rows
    requests_per_prompt = 1 if teacher.supports_n else gen.n_samples
    input_tokens = round(tally.teacher) * requests_per_prompt
    output_per_sample = (
        measured_output_tokens if measured_output_tokens is not None else float(gen.max_tokens)
    )
    output_tokens = round(prompts * gen.n_samples * output_per_sample)
    mode = pricing.teacher_mode(spec.teacher.mode, teacher, prompts * requests_per_prompt)
    cached_tokens = pricing.predicted_cached_tokens(
        tally.prefix_tokens, prompts * requests_per_prompt, teacher.cache_min_tokens
    )
    teacher_cost = teacher.cost(
        input_tokens, output_tokens, cached_tokens=cached_tokens, batch=mode == "batch"
    )

    judge = counters.judge
    judge_cost = 0.0
    judge_in = judge_out = 0
    if judge is not None and counters.judge_count is not None:
        rubric = spec.curation.judge.llm.rubric if spec.curation.judge.llm else None
        per_call = (
            JUDGE_INSTRUCTION_TOKENS
            + (counters.judge_count(rubric) if rubric else 0)
            + round(output_per_sample)
        )
        judge_in = round(per_call * prompts + tally.judge) * gen.n_samples
        judge_out = JUDGE_OUTPUT_TOKENS * prompts * gen.n_samples
        judge_cost = judge.cost(judge_in, judge_out)

    student = counters.student
    params_b = student.params_b if student else DEFAULT_STUDENT_PARAMS_B
    mean_prompt = tally.student / max(1, prompts)
    tr = spec.training
    seq_tokens = min(tr.max_seq_length, mean_prompt + output_per_sample)
    sequences = 2 if tr.bond_beta > 0 else 1
    reference_pass = 1 / 3 if (tr.bond_beta > 0 or tr.bond_gamma > 0) else 0.0
    training_tokens = tr.steps * tr.batch_size * tr.gradient_accumulation * seq_tokens * sequences
    tokens_per_second = counters.catalog.training_tokens_per_second(params_b)
    gpu_minutes = training_tokens * (1 + reference_pass) / tokens_per_second / 60

    limit = spec.budget.max_teacher_cost_usd
    result = Estimate(
        prompts=prompts,
        teacher_calls=prompts * requests_per_prompt,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        teacher_cost_usd=teacher_cost,
        judge_cost_usd=judge_cost,
        gpu_minutes=round(gpu_minutes, 2),
        fits_budget=limit is None or teacher_cost <= limit,
        teacher_mode=mode,
        cached_input_tokens=cached_tokens,
        train_nodes=tr.distributed.nodes if tr.distributed else 1,
        train_processes_per_node=(tr.distributed.gpus_per_node or tr.distributed.procs_per_node)
        if tr.distributed
        else None,
        generation_shards=gen.shards,
    )
    breakdown = {
        "teacher": teacher.id,
        "teacherBaseURL": teacher.base_url,
        "pricePerMTok": {
            "input": teacher.input_per_m_tok,
            "cachedInput": teacher.cached_input_price,
            "output": teacher.output_per_m_tok,
        },
        "teacherMode": mode,
        "batchPriceFactor": teacher.batch_price_factor if mode == "batch" else 1.0,
        "sharedPrefixTokens": tally.prefix_tokens,
        "cacheMinTokens": teacher.cache_min_tokens,
        "teacherCostAtSyncPriceUSD": pricing.sync_price(teacher, input_tokens, output_tokens),
        "priceDate": teacher.price_date,
        "priceNote": teacher.note,
        "supportsN": teacher.supports_n,
        "tokenCounting": counters.count.describe(),
        "counting": {
            "mode": "exact" if tally.exact else "sample",
            "rows": tally.rows,
            "rowsCounted": tally.counted,
            "inputTokensMargin95": (
                round(tally.teacher_margin95 / tally.teacher, 4) if tally.teacher else 0.0
            ),
        },
        "meanInputTokensPerRequest": round(tally.teacher / max(1, prompts), 1),
        "outputTokensPerSample": round(output_per_sample, 1),
        "outputTokensFrom": "measured" if measured_output_tokens is not None else "maxTokens",
        "samplesPerPrompt": gen.n_samples,
        "judge": spec.curation.judge.kind,
        "judgeModel": judge.id if judge else None,
        "judgeInputTokens": judge_in,
        "judgeOutputTokens": judge_out,
        "student": spec.student.model,
        "studentParamsB": params_b,
        "studentInCatalog": student is not None,
        "trainingTokens": round(training_tokens),
        "trainingTokensPerSecond": round(tokens_per_second),
        "totalCostUSD": teacher_cost + judge_cost,
        "budgetUSD": limit,
    }
    return EstimateReport(result, breakdown)
