"""The teacher client against the loopback OpenAI-compatible server: n handling, retries, Retry-After,
rate limits and exact cost accounting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubedistill.catalog import ResolvedTeacher
from kubedistill_testing.fake_teacher import FakeTeacher, count_tokens, prompt_tokens
from kubedistill_trainer import teacher as teacher_mod
from kubedistill_trainer.speed import percentile, speed_figures
from kubedistill_trainer.teacher import (
    TeacherAuthFailed,
    TeacherClient,
    TeacherError,
    TeacherRejected,
    TokenBucket,
    retry_after_seconds,
)

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-unit-test-0123456789abcdef"
PRICE_IN, PRICE_OUT = 2.0, 8.0


def resolved(base_url: str, supports_n: bool = True) -> ResolvedTeacher:
    return ResolvedTeacher(
        id="acme/teacher",
        provider="acme",
        api_model="teacher-1",
        base_url=base_url,
        input_per_m_tok=PRICE_IN,
        output_per_m_tok=PRICE_OUT,
        price_date="2026-11-01",
        supports_n=supports_n,
        chars_per_token=4.0,
        known_price=True,
    )


def ask(client_kwargs: dict[str, Any], prompts: list[str], n: int = 1, **complete: Any) -> Any:
    async def go() -> tuple[list[Any], TeacherClient]:
        async with TeacherClient(**client_kwargs) as client:
            out = await asyncio.gather(
                *(
                    client.complete([{"role": "user", "content": p}], n=n, max_tokens=64, **complete)
                    for p in prompts
                )
            )
            return list(out), client

    return asyncio.run(go())


@pytest.fixture
def fast_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the client's backoff delays and wait a tiny fraction of them."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        # This patches asyncio itself; the zero-second yields of other libraries are not backoffs.
        if delay > 0:
            delays.append(delay)
        await real_sleep(min(delay, 0.01))

    monkeypatch.setattr(teacher_mod.asyncio, "sleep", sleep)
    return delays


@pytest.fixture
def server() -> Iterator[FakeTeacher]:
    with FakeTeacher(api_key=KEY) as fake:
        yield fake


def test_n_samples_in_one_request_and_exact_cost(server: FakeTeacher) -> None:
    (completion,), client = ask({"teacher": resolved(server.base_url), "api_key": KEY}, ["What is 2+2?"], n=4)
    assert [c.n for c in server.calls] == [4]
    assert completion.texts == [f"Answer {i} to: What is 2+2?" for i in range(4)]
    expected_in = prompt_tokens([{"role": "user", "content": "What is 2+2?"}])
    expected_out = sum(count_tokens(t) for t in completion.texts)
    assert (completion.usage.input_tokens, completion.usage.output_tokens) == (expected_in, expected_out)
    assert completion.usage.cost_usd == pytest.approx(
        (expected_in * PRICE_IN + expected_out * PRICE_OUT) / 1e6
    )
    assert client.usage.calls == 1 and client.usage.cost_usd == completion.usage.cost_usd


def ask_in_order(teacher: ResolvedTeacher, messages: list[list[dict[str, str]]]) -> list[Any]:
    async def go() -> list[Any]:
        async with TeacherClient(teacher) as client:
            return [await client.complete(m, max_tokens=64) for m in messages]

    return asyncio.run(go())


def test_cached_prefix_is_reported_and_priced_at_the_cached_price() -> None:
    instruction = {"role": "system", "content": "Label the ticket. " * 40}
    requests = [[instruction, {"role": "user", "content": p}] for p in ("a", "b", "a short one")]
    prefix = count_tokens(instruction["content"]) + 4
    with FakeTeacher(cache_min_tokens=prefix) as server:
        teacher = resolved(server.base_url).model_copy(update={"cached_input_per_m_tok": 0.5})
        # One after the other: the first request writes the cache the others read.
        first, *rest = ask_in_order(teacher, requests)
        assert server.cached_tokens_total == 2 * prefix
    assert first.usage.cached_input_tokens == 0
    assert [c.usage.cached_input_tokens for c in rest] == [prefix, prefix]
    for completion in rest:
        u = completion.usage
        expected = ((u.input_tokens - prefix) * PRICE_IN + prefix * 0.5 + u.output_tokens * PRICE_OUT) / 1e6
        assert u.cost_usd == pytest.approx(expected)
    with FakeTeacher(cache_min_tokens=prefix + 1) as server:
        # A prefix shorter than the provider caches is not cached.
        completions = ask_in_order(resolved(server.base_url), requests)
    assert [c.usage.cached_input_tokens for c in completions] == [0, 0, 0]


def test_without_n_support_sends_n_requests_with_distinct_seeds() -> None:
    with FakeTeacher(supports_n=False) as server:
        (completion,), client = ask(
            {"teacher": resolved(server.base_url, supports_n=False)}, ["q"], n=3, seed=7
        )
        assert sorted(c.n for c in server.calls) == [1, 1, 1]
        assert len(completion.texts) == 3 and client.usage.calls == 3
        # Input is billed once per request here: three prompts' worth.
        assert completion.usage.input_tokens == 3 * prompt_tokens([{"role": "user", "content": "q"}])


def test_seeds_differ_per_request() -> None:
    seen: list[int] = []

    def answer(prompt: str, sample: int, request: dict[str, Any]) -> str:
        seen.append(request["seed"])
        return "ok"

    with FakeTeacher(answers=answer, supports_n=False) as server:
        ask({"teacher": resolved(server.base_url, supports_n=False)}, ["q"], n=3, seed=7)
    assert sorted(seen) == [7, 8, 9]


def test_provider_rejecting_n_is_not_retried() -> None:
    with (
        FakeTeacher(supports_n=False) as server,
        pytest.raises(TeacherRejected, match="n > 1 is not supported"),
    ):
        ask({"teacher": resolved(server.base_url, supports_n=True)}, ["q"], n=2)
    assert len(server.calls) == 1


def test_failures_are_retried_and_only_successes_are_counted(fast_sleep: list[float]) -> None:
    with FakeTeacher(
        fail_rate=0.3, failures=("429", "500", "timeout", "disconnect"), hang_seconds=2, seed=3
    ) as server:
        prompts = [f"prompt {i}" for i in range(40)]
        completions, client = ask(
            {"teacher": resolved(server.base_url), "timeout": 0.3, "max_concurrency": 8, "max_retries": 12},
            prompts,
            n=2,
        )
        kinds = {c.kind for c in server.calls}
        assert {"429", "500", "timeout", "disconnect"} <= kinds
        assert all(len(c.texts) == 2 for c in completions)
        ok = server.ok_calls()
        assert len(ok) == 40 == client.usage.calls
        assert sorted(c.prompt for c in ok) == sorted(prompts)  # each prompt answered exactly once
        tokens_in, tokens_out = server.usage_totals()
        assert (client.usage.input_tokens, client.usage.output_tokens) == (tokens_in, tokens_out)
        assert client.usage.cost_usd == pytest.approx((tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6)
        assert sum(client.retries.values()) == len(server.calls) - len(ok)


def test_retry_after_is_honoured(fast_sleep: list[float]) -> None:
    with FakeTeacher(fail_rate=1.0, failures=("429",), retry_after=2.5) as server:
        with pytest.raises(TeacherError, match="failed after 3 attempts"):
            ask({"teacher": resolved(server.base_url), "max_retries": 2}, ["q"])
        assert len(server.calls) == 3
    # Each wait is the server's retry-after-ms (2.5 s) plus at most 10% jitter, not the short backoff.
    assert len(fast_sleep) == 2 and all(2.5 <= d <= 2.5 * 1.1 + 0.01 for d in fast_sleep)


def test_backoff_grows_exponentially_with_jitter(fast_sleep: list[float]) -> None:
    with FakeTeacher(fail_rate=1.0, failures=("500",)) as server, pytest.raises(TeacherError):
        ask({"teacher": resolved(server.base_url), "max_retries": 5, "backoff_base": 1.0, "seed": 1}, ["q"])
    caps = [min(30.0, 2**i) for i in range(5)]
    assert all(0 <= d <= cap for d, cap in zip(fast_sleep, caps, strict=True))
    assert len(set(fast_sleep)) == 5


def test_wrong_key_fails_fast_without_leaking_it(server: FakeTeacher) -> None:
    wrong = "sk-wrong-key-9876543210fedcba"
    with pytest.raises(TeacherAuthFailed) as err:
        ask({"teacher": resolved(server.base_url), "api_key": wrong}, ["q"])
    assert len(server.calls) == 1
    assert wrong not in str(err.value) and "HTTP 401" in str(err.value)


def test_connection_refused_is_retried_then_unavailable(fast_sleep: list[float]) -> None:
    from kubedistill_testing.s3 import free_port

    with pytest.raises(TeacherError, match="connection error"):
        ask({"teacher": resolved(f"http://127.0.0.1:{free_port()}/v1"), "max_retries": 2}, ["q"])
    assert len(fast_sleep) == 2


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert retry_after_seconds(httpx.Headers({"retry-after": "3"})) == 3.0
    assert retry_after_seconds(httpx.Headers({"retry-after": "Thu, 01 Jan 1970 00:00:00 GMT"})) == 0.0
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({})) is None


def test_token_bucket_waits_for_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    waits: list[float] = []

    async def fake_sleep(delay: float) -> None:
        waits.append(delay)
        now[0] += delay

    monkeypatch.setattr(teacher_mod.asyncio, "sleep", fake_sleep)
    bucket = TokenBucket(60, clock=lambda: now[0])  # one per second, bursts of 60

    async def go() -> None:
        for _ in range(60):
            await bucket.acquire(1)
        assert waits == []
        await bucket.acquire(1)
        await bucket.acquire(2)
        bucket.adjust(-5)  # five units given back (the real usage was lower)
        await bucket.acquire(5)

    asyncio.run(go())
    assert waits == [pytest.approx(1.0), pytest.approx(2.0)]


def test_request_shape_follows_the_catalog() -> None:
    seen: list[dict[str, Any]] = []

    def answer(prompt: str, sample: int, request: dict[str, Any]) -> str:
        seen.append(request)
        return "ok"

    with FakeTeacher(answers=answer) as server:
        reasoning = resolved(server.base_url).model_copy(
            update={"max_tokens_param": "max_completion_tokens", "supports_temperature": False}
        )
        ask({"teacher": reasoning}, ["q"], temperature=0.7)
        ask({"teacher": resolved(server.base_url)}, ["q"], temperature=0.7)
    assert (
        "temperature" not in seen[0]
        and seen[0]["max_completion_tokens"] == 64
        and "max_tokens" not in seen[0]
    )
    assert seen[1]["temperature"] == 0.7 and seen[1]["max_tokens"] == 64


def test_fake_teacher_command_line(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "2+2?", "answers": ["4", "four"]}) + "\n")
    log = tmp_path / "calls.jsonl"
    path = os.pathsep.join([str(REPO / "operator" / "src"), str(REPO / "trainer-image" / "src")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubedistill_testing.fake_teacher", "--answers", str(answers),
         "--call-log", str(log), "--api-key-env", "FAKE_KEY", "--model", "m1"],
        env={**os.environ, "PYTHONPATH": path, "FAKE_KEY": KEY},
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        base = json.loads(proc.stdout.readline())["baseURL"]
        auth = {"authorization": f"Bearer {KEY}"}
        models = httpx.get(f"{base}/models", headers=auth).json()
        assert [m["id"] for m in models["data"]] == ["m1"]
        body = {"model": "m1", "messages": [{"role": "user", "content": "2+2?"}], "n": 2}
        reply = httpx.post(f"{base}/chat/completions", json=body, headers=auth).json()
        assert [c["message"]["content"] for c in reply["choices"]] == ["4", "four"]
        assert httpx.post(f"{base}/chat/completions", json=body).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [json.loads(line)["status"] for line in log.read_text().splitlines()] == [200, 401]


def test_responses_without_usage_are_counted_not_priced() -> None:
    with FakeTeacher(report_usage=False) as server:
        (completion,), client = ask({"teacher": resolved(server.base_url)}, ["q"], n=2)
    assert len(completion.texts) == 2 and completion.usage.cost_usd == 0
    assert client.responses_without_usage == 1 and client.usage.calls == 1


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch, fast_sleep: list[float]) -> None:
    from kubedistill_testing.s3 import free_port
    from kubedistill_trainer.teacher import env_proxy

    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    with FakeTeacher() as server:
        assert env_proxy(server.base_url) == dead_proxy
        with pytest.raises(TeacherError, match="connection error"):
            ask({"teacher": resolved(server.base_url), "max_retries": 1}, ["q"])
        assert server.calls == []  # the request went to the (dead) proxy, not around it
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert env_proxy(server.base_url) is None
        ask({"teacher": resolved(server.base_url)}, ["q"])
        assert len(server.calls) == 1


def test_latency_per_request_and_a_llama_cpp_servers_own_timings() -> None:
    with FakeTeacher(report_timings=True, latency=0.02) as server:
        _, client = ask({"teacher": resolved(server.base_url, supports_n=False)}, ["a", "b"], n=2)
    assert len(client.latencies) == 4 and min(client.latencies) >= 0.02
    ok = server.ok_calls()
    assert client.engine.requests == 4
    assert client.engine.prompt_tokens == sum(c.prompt_tokens for c in ok)
    assert client.engine.decode_tokens == sum(c.completion_tokens for c in ok)
    figures = speed_figures("teacher", client.latencies, client.engine)
    assert (
        figures["teacherPromptTokensPerSecond"] == 1000.0 and figures["teacherDecodeTokensPerSecond"] == 100.0
    )
    assert figures["teacherLatencyP50Sec"] <= figures["teacherLatencyP95Sec"]


def test_a_server_without_timings_gives_no_rates() -> None:
    with FakeTeacher() as server:
        _, client = ask({"teacher": resolved(server.base_url)}, ["a"])
    figures = speed_figures("teacher", client.latencies, client.engine)
    assert figures["teacherPromptTokensPerSecond"] is None and figures["teacherDecodeTokensPerSecond"] is None
    assert figures["teacherTimedRequests"] == 0 and figures["teacherLatencyP50Sec"] is not None


@pytest.mark.parametrize(("q", "expected"), [(0.5, 2.0), (0.95, 4.0), (0.0, 1.0), (1.0, 4.0)])
def test_nearest_rank_percentile(q: float, expected: float) -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == expected
