"""The cost and size estimate of a job, before it spends anything. One pure function, used by the
operator (status.estimate), the CLI (`kubedistill estimate`) and the SDK (`Distiller.estimate`).

    report = estimate(spec, rows, load_catalog(), tokenizer=None, measured_output_tokens=None)
    report.estimate            # the api model Estimate (status.estimate)
    report.breakdown           # how each figure was reached, for humans

- Input tokens are counted on the actual rows as the teacher will see them (teacher instruction +
  row system text + prompt or messages, plus the chat framing of 4 tokens a message and 2 a
  request): with `tokenizer` when given (anything with `encode(text)`, or a callable returning a
  count), else the teacher family's calibrated chars-per-token. A provider without `n` support is
  billed the input once per sample.
- Cached input (`domain.pricing`): when the provider caches prompt prefixes by itself, all requests
  but the first read the prefix they share (teacher instruction, few-shot turns) from the cache,
  priced at the catalog's cached price. `teacher.mode` resolved to batch prices everything at the
  batch price. `mode: batch` for a provider without a batch API raises BatchUnsupported.
- Output tokens per sample are `measured_output_tokens` (the mean of earlier runs) when given, else
  `generation.maxTokens` — an upper bound.
- An `llm` judge costs one call per candidate: the question, the answer, the rubric and ~80 tokens
  of instruction in, ~40 tokens out.
- GPU minutes: the tokens training pushes through the student (steps × batch × accumulation ×
  sequence length; the preference term doubles the sequences, the reference pass adds a third)
  divided by the catalog's throughput for the student's size.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def estimate(
    spec: DistillationJobSpec,
    rows: Sequence[Row],
    catalog: Catalog,
    tokenizer: Any = None,
    measured_output_tokens: float | None = None,
) -> EstimateReport:
    rows = rows[: spec.dataset.num_prompts] if spec.dataset.num_prompts else rows
    gen = spec.generation
    teacher = catalog.resolve_teacher(spec.teacher.model, spec.teacher.base_url)
    count = _Counter(tokenizer, teacher.chars_per_token)
    prompts = len(rows)
    requests_per_prompt = 1 if teacher.supports_n else gen.n_samples
    examples = gen.few_shot_turns()
    prompt_tokens = [request_tokens(r.teacher_messages(gen.system_prompt, examples), count) for r in rows]
    input_tokens = sum(prompt_tokens) * requests_per_prompt
    output_per_sample = (
        measured_output_tokens if measured_output_tokens is not None else float(gen.max_tokens)
    )
    output_tokens = round(prompts * gen.n_samples * output_per_sample)
    mode = pricing.teacher_mode(spec.teacher.mode, teacher, prompts * requests_per_prompt)
    # A second pass, not a list of every request: each copies the few-shot turns (memory of large jobs).
    prefix = pricing.shared_prefix(r.teacher_messages(gen.system_prompt, examples) for r in rows)
    prefix_tokens = sum(count(m["content"]) + MESSAGE_OVERHEAD for m in prefix)
    cached_tokens = pricing.predicted_cached_tokens(
        prefix_tokens, prompts * requests_per_prompt, teacher.cache_min_tokens
    )
    teacher_cost = teacher.cost(
        input_tokens, output_tokens, cached_tokens=cached_tokens, batch=mode == "batch"
    )

    judge = _judge_teacher(spec, catalog)
    judge_cost = 0.0
    judge_in = judge_out = 0
    if judge is not None:
        rubric = spec.curation.judge.llm.rubric if spec.curation.judge.llm else None
        judge_count = _Counter(tokenizer, judge.chars_per_token)
        per_call = (
            JUDGE_INSTRUCTION_TOKENS + (judge_count(rubric) if rubric else 0) + round(output_per_sample)
        )
        questions = sum(
            judge_count(r.prompt_text()) + (judge_count(r.reference) if r.reference else 0) for r in rows
        )
        judge_in = (per_call * prompts + questions) * gen.n_samples
        judge_out = JUDGE_OUTPUT_TOKENS * prompts * gen.n_samples
        judge_cost = judge.cost(judge_in, judge_out)

    student = catalog.student(spec.student.model)
    params_b = student.params_b if student else DEFAULT_STUDENT_PARAMS_B
    student_count = _Counter(tokenizer, student.chars_per_token if student else teacher.chars_per_token)
    mean_prompt = sum(request_tokens(r.student_messages(), student_count) for r in rows) / max(1, prompts)
    tr = spec.training
    seq_tokens = min(tr.max_seq_length, mean_prompt + output_per_sample)
    sequences = 2 if tr.bond_beta > 0 else 1
    reference_pass = 1 / 3 if (tr.bond_beta > 0 or tr.bond_gamma > 0) else 0.0
    training_tokens = tr.steps * tr.batch_size * tr.gradient_accumulation * seq_tokens * sequences
    tokens_per_second = catalog.training_tokens_per_second(params_b)
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
        "sharedPrefixTokens": prefix_tokens,
        "cacheMinTokens": teacher.cache_min_tokens,
        "teacherCostAtSyncPriceUSD": pricing.sync_price(teacher, input_tokens, output_tokens),
        "priceDate": teacher.price_date,
        "priceNote": teacher.note,
        "supportsN": teacher.supports_n,
        "tokenCounting": count.describe(),
        "meanInputTokensPerRequest": round(sum(prompt_tokens) / max(1, prompts), 1),
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
