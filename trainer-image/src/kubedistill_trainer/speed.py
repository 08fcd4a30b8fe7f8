"""Per-request speed figures that say what they measure, for the teacher (generate) and the student
(evaluate): latency p50/p95 of whole requests as the caller sees them, and llama.cpp's own timings of
prompt processing and decoding taken apart.

A single "tokens/s" over whole requests mixes three things: for a 50-token prompt and a 2-token
answer it is mostly prompt processing and call overhead, and reads as a slow decoder. llama.cpp
counts them apart: prompt tokens it evaluated (a prefix kept from the previous request is reused,
not counted) with their milliseconds, and decoded tokens with theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class EngineTimings:
    """llama.cpp's timings summed over requests; `requests` counts those that reported any."""

    requests: int = 0
    prompt_tokens: int = 0
    prompt_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0

    def add(self, prompt_tokens: int, prompt_ms: float, decode_tokens: int, decode_ms: float) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.prompt_ms += prompt_ms
        self.decode_tokens += decode_tokens
        self.decode_ms += decode_ms

    def add_server_timings(self, timings: Any) -> None:
        """The `timings` object llama.cpp's server (llama-server) puts in each response; others are ignored."""
        if not isinstance(timings, Mapping):
            return
        try:
            self.add(
                int(timings["prompt_n"]),
                float(timings["prompt_ms"]),
                int(timings["predicted_n"]),
                float(timings["predicted_ms"]),
            )
        except (KeyError, TypeError, ValueError):
            return


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _rate(tokens: int, ms: float) -> float | None:
    return round(1000.0 * tokens / ms, 2) if tokens and ms > 0 else None


def speed_figures(who: str, latencies: Sequence[float], engine: EngineTimings) -> dict[str, Any]:
    """`{who}LatencyP50Sec`, `…P95Sec`, `…PromptTokensPerSecond`, `…DecodeTokensPerSecond`, `…TimedRequests`:
    None where nothing was measured (no request, or an engine that reports no timings)."""
    return {
        f"{who}LatencyP50Sec": round(percentile(latencies, 0.5), 4) if latencies else None,
        f"{who}LatencyP95Sec": round(percentile(latencies, 0.95), 4) if latencies else None,
        f"{who}PromptTokensPerSecond": _rate(engine.prompt_tokens, engine.prompt_ms),
        f"{who}DecodeTokensPerSecond": _rate(engine.decode_tokens, engine.decode_ms),
        f"{who}TimedRequests": engine.requests,
    }
