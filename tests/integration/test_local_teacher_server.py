"""Local mode's teacher server: llama-cpp-python's OpenAI-compatible server, whose chat answers carry
llama.cpp's own timings in llama.cpp's field names, which the teacher client sums apart from latency."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kubedistill.catalog import ResolvedTeacher
from kubedistill.local.models import local_gguf
from kubedistill.local.processes import llama_server
from kubedistill_trainer.speed import speed_figures
from kubedistill_trainer.teacher import TeacherClient

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def test_answers_carry_llama_cpps_timings(tmp_path: Path) -> None:
    async def ask(url: str) -> TeacherClient:
        teacher = ResolvedTeacher(
            id=f"local/{MODEL}", provider="local", api_model=MODEL, base_url=url, input_per_m_tok=0.0,
            output_per_m_tok=0.0, price_date="2026-12-03", supports_n=False, chars_per_token=4.0,
            known_price=True,
        )  # fmt: skip
        async with TeacherClient(teacher, max_concurrency=2) as client:
            for prompt in ("Name a colour.", "Name a fruit.", "Name a colour."):
                await client.complete([{"role": "user", "content": prompt}], max_tokens=4, temperature=0.1)
            return client

    with llama_server(local_gguf(MODEL), MODEL, tmp_path / "server.log", threads=1) as url:
        client = asyncio.run(ask(url))
    engine = client.engine
    assert engine.requests == 3 and len(client.latencies) == 3
    # Each answer's own counters (reset per call): at most max_tokens decoded, some prompt evaluated.
    assert 0 < engine.decode_tokens <= 3 * 4 and engine.prompt_tokens > 0
    assert (
        engine.prompt_tokens <= client.usage.input_tokens
    )  # a prefix kept from the last call is not evaluated
    figures = speed_figures("teacher", client.latencies, engine)
    assert figures["teacherPromptTokensPerSecond"] > 0 and figures["teacherDecodeTokensPerSecond"] > 0
