"""Batch mode's pure parts (requests, budget split, result mapping) and the pricing of cache and batch."""

from __future__ import annotations

from typing import Any

import pytest

from kubedistill.api.models import DistillationJobSpec, GenerationSpec
from kubedistill.catalog import ResolvedTeacher, load_catalog
from kubedistill.dataset import Row
from kubedistill.domain import pricing
from kubedistill.estimating import estimate_dataset
from kubedistill_trainer.batch import MAX_BATCH_REQUESTS, Group, affordable, sample_groups
from kubedistill_trainer.batch_api import anthropic_collect, anthropic_params, openai_collect, openai_line
from kubedistill_trainer.shards import Work


def teacher(supports_n: bool = True, batch_api: Any = "openai") -> ResolvedTeacher:
    return ResolvedTeacher(
        id="acme/t",
        provider="acme",
        api_model="t",
        base_url="http://127.0.0.1:1/v1",
        input_per_m_tok=2.0,
        cached_input_per_m_tok=0.5,
        output_per_m_tok=8.0,
        price_date="2026-11-01",
        supports_n=supports_n,
        chars_per_token=4.0,
        known_price=True,
        batch_api=batch_api,
        batch_price_factor=0.5,
        cache_min_tokens=100,
    )


def works(count: int) -> list[Work]:
    return [Work(Row(id=f"r{i}", prompt=f"prompt {i}"), "train") for i in range(count)]


def completion_line(custom_id: str, text: str, prompt_tokens: int = 10, cached: int = 0) -> dict[str, Any]:
    body = {
        "choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }
    return {"custom_id": custom_id, "response": {"status_code": 200, "body": body}, "error": None}


def test_cost_of_cached_input_and_batch_requests() -> None:
    t = teacher()
    assert t.cost(1_000_000, 1_000_000) == pytest.approx(2.0 + 8.0)
    assert t.cost(1_000_000, 1_000_000, cached_tokens=400_000) == pytest.approx(0.6 * 2.0 + 0.4 * 0.5 + 8.0)
    assert t.cost(1_000_000, 0, cached_tokens=400_000, batch=True) == pytest.approx((1.2 + 0.2) * 0.5)
    no_discount = t.model_copy(update={"cached_input_per_m_tok": None})
    assert no_discount.cost(1_000_000, 0, cached_tokens=1_000_000) == pytest.approx(2.0)
    catalog = load_catalog(environ={})
    gpt = catalog.resolve_teacher("openai/gpt-4o-mini")
    assert (gpt.batch_api, gpt.batch_price_factor, gpt.cache_min_tokens) == ("openai", 0.5, 1024)
    assert gpt.cost(10**6, 0, cached_tokens=10**6) == pytest.approx(0.075)
    groq = catalog.resolve_teacher("groq/llama-3.1-8b-instant")
    # No cached price listed: no discount.
    assert (groq.batch_api, groq.cost(10**6, 0, cached_tokens=10**6)) == (None, pytest.approx(0.05))


def test_mode_resolution() -> None:
    with_batch, without = teacher(), teacher(batch_api=None)
    assert pricing.teacher_mode("sync", with_batch, 10**6) == "sync"
    assert pricing.teacher_mode("batch", with_batch, 1) == "batch"
    assert pricing.teacher_mode("auto", with_batch, pricing.AUTO_BATCH_MIN_REQUESTS) == "batch"
    assert pricing.teacher_mode("auto", with_batch, pricing.AUTO_BATCH_MIN_REQUESTS - 1) == "sync"
    assert pricing.teacher_mode("auto", without, 10**6) == "sync"
    with pytest.raises(
        pricing.BatchUnsupported, match=r"teacher\.mode batch: the catalog lists no batch API"
    ):
        pricing.teacher_mode("batch", without, 10**6)


def shared_prefix(requests: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    prefix = None
    for messages in requests:
        prefix = pricing.narrow_prefix(prefix, messages)
    return prefix or []


def test_shared_prefix_and_predicted_cached_tokens() -> None:
    system = {"role": "system", "content": "be brief"}
    shot = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    requests = [[system, *shot, {"role": "user", "content": q}] for q in ("a", "b", "c")]
    assert shared_prefix(requests) == [system, *shot]
    assert shared_prefix([*requests, [system, {"role": "user", "content": "d"}]]) == [system]
    # The last message is the prompt: never part of the prefix, even when two requests are equal.
    assert shared_prefix([[system], [system]]) == []
    assert pricing.predicted_cached_tokens(300, 10, 256) == 300 * 9
    assert pricing.predicted_cached_tokens(300, 10, 1024) == 0
    assert pricing.predicted_cached_tokens(300, 10, None) == 0


def test_sample_groups_match_the_sync_requests() -> None:
    gen = GenerationSpec(n_samples=3, seed=7, max_tokens=16)
    with_n = sample_groups(works(2), gen, teacher(supports_n=True))
    assert with_n == [Group("p0-s0", "r0", 0, 3, 7), Group("p1-s0", "r1", 0, 3, 7)]
    one_by_one = sample_groups(works(1), gen, teacher(supports_n=False))
    assert [(g.first, g.n, g.seed) for g in one_by_one] == [(0, 1, 7), (1, 1, 8), (2, 1, 9)]
    line = openai_line(teacher(), with_n[0], [{"role": "user", "content": "prompt 0"}], gen)
    assert line["custom_id"] == "p0-s0" and line["url"] == "/v1/chat/completions"
    assert line["body"] == {
        "model": "t",
        "messages": [{"role": "user", "content": "prompt 0"}],
        "max_tokens": 16,
        "temperature": 0.8,
        "n": 3,
        "seed": 7,
    }


def test_affordable_splits_by_budget_and_provider_limit() -> None:
    groups = [Group(f"p{i}", f"r{i}", 0, 1, None) for i in range(10)]
    assert affordable(groups, None) == 10
    assert affordable(groups, 3.99) == 3
    assert affordable(groups, 0.5) == 0
    assert affordable(groups, -1.0) == 0
    many = [groups[0]] * (MAX_BATCH_REQUESTS + 5)
    assert affordable(many, None) == MAX_BATCH_REQUESTS


def test_collect_maps_results_by_custom_id_and_counts_the_rest() -> None:
    t = teacher()
    output = [
        completion_line("a", "A", prompt_tokens=100, cached=60),
        completion_line("stray", "?"),
        completion_line("a", "again"),  # a second answer for the same request
        {"custom_id": "b", "response": {"status_code": 200, "body": {"oops": 1}}},
    ]
    errors = [
        {"custom_id": "c", "response": {"status_code": 500, "body": {"error": {"message": "boom"}}}},
        {"custom_id": "d", "response": None, "error": {"code": "batch_expired", "message": "expired"}},
        {"custom_id": "e", "response": {"status_code": 400, "body": {"error": {"message": "bad n"}}}},
        {"custom_id": "f", "response": {"status_code": 429, "body": {}}},
    ]
    got = openai_collect(output, errors, ["a", "b", "c", "d", "e", "f", "g"], t)
    assert got.answers["a"].texts == ["A"] and set(got.answers) == {"a"}
    assert got.answers["a"].usage.cached_input_tokens == 60
    assert got.answers["a"].usage.cost_usd == pytest.approx(t.cost(100, 5, cached_tokens=60, batch=True))
    assert got.unknown == 2  # the stray line and the duplicate
    assert sorted(got.retry) == ["b", "c", "d", "f", "g"]  # malformed, 5xx, expired, 429, missing
    assert got.rejected == {"e": "HTTP 400: bad n"}
    # Every answered line is paid for, whether or not it maps to a request.
    assert got.usage.calls == 3


def test_anthropic_requests_have_no_n_and_their_results_map_back() -> None:
    gen = GenerationSpec(n_samples=2, seed=7, max_tokens=16)
    claude = teacher(supports_n=True, batch_api="anthropic")
    # Anthropic has no n: one request per sample even where the catalog says n works for sync calls.
    assert [(g.n, g.first) for g in sample_groups(works(1), gen, claude)] == [(1, 0), (1, 1)]
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
    ]
    assert anthropic_params(claude, messages, gen) == {
        "model": "t",
        "max_tokens": 16,
        "system": "be brief",
        "messages": messages[1:],
        "temperature": 0.8,
    }
    message = {
        "content": [{"type": "text", "text": "6"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 30, "cache_read_input_tokens": 70, "output_tokens": 2},
    }

    def errored(kind: str) -> dict[str, Any]:
        return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": "no"}}}

    lines = [
        {"custom_id": "a", "result": {"type": "succeeded", "message": message}},
        {"custom_id": "b", "result": {"type": "expired"}},
        {"custom_id": "c", "result": errored("overloaded_error")},
        {"custom_id": "d", "result": errored("invalid_request_error")},
        {"custom_id": "stray", "result": {"type": "succeeded", "message": message}},
    ]
    got = anthropic_collect(lines, ["a", "b", "c", "d", "e"], claude)
    usage = got.answers["a"].usage
    assert got.answers["a"].texts == ["6"]
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (100, 70, 2)
    assert usage.cost_usd == pytest.approx(claude.cost(100, 2, cached_tokens=70, batch=True))
    assert sorted(got.retry) == ["b", "c", "e"] and got.rejected == {"d": "invalid_request_error: no"}
    assert got.unknown == 1 and got.usage.calls == 2


def test_the_estimate_refuses_batch_mode_for_a_provider_without_a_batch_api() -> None:
    """The estimate stage runs this; its BatchUnsupported (reason `BatchUnsupported`) fails the stage,
    and so the job with EstimateFailed, before any teacher call."""

    def spec(model: str) -> DistillationJobSpec:
        return DistillationJobSpec.model_validate(
            {
                "teacher": {"model": model, "mode": "batch"},
                "student": {"model": "qwen3-0.6b"},
                "dataset": {"prompts": ["a"]},
            }
        )

    catalog = load_catalog(environ={})
    with pytest.raises(pricing.BatchUnsupported) as refused:
        estimate_dataset(spec("groq/llama-3.1-8b-instant"), catalog)
    assert str(refused.value) == (
        "teacher.mode batch: the catalog lists no batch API for groq/llama-3.1-8b-instant "
        "(provider groq); use mode sync or auto, or set batchAPI for the provider in a catalog override"
    )
    assert refused.value.reason == "BatchUnsupported"
    report, _ = estimate_dataset(spec("openai/gpt-4o"), catalog)
    assert report.estimate.teacher_mode == "batch"
