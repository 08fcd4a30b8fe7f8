"""What the quick start's generation costs in each teacher mode, and how close the estimate is (issue 13).

The quick start's job (the triage instruction and twenty few-shot turns ahead of each of 200
tickets, 3 samples each, no `n`: 600 requests) against the loopback teacher, priced like
openai/gpt-4.1-mini ($0.40 input, $0.10 cached input, $1.60 output per M tokens, batch at half
price), its prompt cache reading a repeated prefix of `--cache-min-tokens` or more (OpenAI: 1024;
the quick start's prefix is ~770 tokens by the server's count, so the default here is 256):

- baseline: sync mode at a provider without a prompt cache (what every job paid before);
- sync with the prompt cache;
- batch with the prompt cache.

Costs are the stage's own accounting, checked against the server's usage; the estimate is made
with the output tokens measured by the baseline run (as `measured_output_tokens`).

    python bench/teacher_cost_modes.py [--cache-min-tokens 256]

Ends with one JSON line; `ratio` = batch-with-cache cost / baseline cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [
    str(REPO / "operator" / "src"),
    str(REPO / "trainer-image" / "src"),
    str(REPO / "tests" / "harness"),
]

from kubedistill import dataset  # noqa: E402
from kubedistill.api.models import DistillationJobSpec, Stage  # noqa: E402
from kubedistill.api.stage import JobRef, StageInvocation  # noqa: E402
from kubedistill.catalog import load_catalog  # noqa: E402
from kubedistill.domain.estimate import estimate  # noqa: E402
from kubedistill_testing.fake_teacher import FakeTeacher  # noqa: E402
from kubedistill_trainer import generate  # noqa: E402

QUICKSTART = REPO / "examples" / "quickstart"
LABELS = ("billing", "bug", "account", "feature_request", "shipping")
PRICES = {"in": 0.40, "cached": 0.10, "out": 1.60}


def label(prompt: str, sample: int, request: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{prompt}{request.get('seed')}{sample}".encode()).hexdigest()
    return LABELS[int(digest, 16) % len(LABELS)]


def run(workdir: Path, mode: str, cache_min_tokens: int | None) -> dict[str, Any]:
    quickstart = yaml.safe_load((QUICKSTART / "job.yaml").read_text())["spec"]
    tickets = [json.loads(line)["prompt"] for line in (QUICKSTART / "tickets.jsonl").read_text().splitlines()]
    workdir.mkdir(parents=True)
    with FakeTeacher(answers=label, supports_n=False, cache_min_tokens=cache_min_tokens) as teacher:
        cache = f", cacheMinTokens: {cache_min_tokens}" if cache_min_tokens else ""
        (workdir / "teachers.yaml").write_text(
            f"providers:\n  acme: {{baseURL: '{teacher.base_url}', supportsN: false, batchAPI: openai{cache}}}\n"
            f"teachers:\n  - {{id: acme/t, inputPerMTok: {PRICES['in']}, cachedInputPerMTok: {PRICES['cached']},"
            f" outputPerMTok: {PRICES['out']}, priceDate: '2026-12-03'}}\n"
        )
        os.environ["KUBEDISTILL_CATALOG_DIR"] = str(workdir)
        spec = DistillationJobSpec.model_validate(
            quickstart
            | {
                "teacher": {"model": "acme/t", "mode": mode},
                "student": {"model": "smollm2-135m"},
                "dataset": {"prompts": tickets[:200], "testFraction": 0.2},
            }
        )
        inv = StageInvocation(
            job=JobRef(name="q", namespace="n", uid=mode),
            spec=spec,
            stage=Stage.GENERATE,
            artifact_base=workdir.as_uri(),
        )
        result = generate.run(inv)
        assert result.ok, result.message
        tokens_in, tokens_out = teacher.usage_totals()
        server_cost = (
            (
                (tokens_in - teacher.cached_tokens_total) * PRICES["in"]
                + teacher.cached_tokens_total * PRICES["cached"]
                + tokens_out * PRICES["out"]
            )
            / 1e6
            * (0.5 if mode == "batch" else 1.0)
        )
    metrics = result.metrics
    assert metrics.teacher_cost_total is not None and abs(metrics.teacher_cost_total - server_cost) < 1e-9
    return {"spec": spec, "metrics": metrics, "catalog": load_catalog()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-min-tokens", type=int, default=256)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "baseline": run(Path(tmp) / "baseline", "sync", None),
            "sync_cached": run(Path(tmp) / "sync", "sync", args.cache_min_tokens),
            "batch_cached": run(Path(tmp) / "batch", "batch", args.cache_min_tokens),
        }
        base = runs["baseline"]["metrics"]
        measured = base.teacher_output_tokens / base.candidates
        for name, r in runs.items():
            spec, m = r["spec"], r["metrics"]
            rows = dataset.load(spec.dataset).rows
            e = estimate(spec, rows, r["catalog"], measured_output_tokens=measured).estimate
            out[name] = {
                "costUSD": round(m.teacher_cost_total, 6),
                "estimatedCostUSD": round(e.teacher_cost_usd, 6),
                "estimateError": round(e.teacher_cost_usd / m.teacher_cost_total - 1, 4),
                "cachedInputTokens": m.teacher_cached_input_tokens or 0,
                "estimatedCachedInputTokens": e.cached_input_tokens,
                "inputTokens": m.teacher_input_tokens,
            }
            print(name, json.dumps(out[name]))
    baseline = out["baseline"]["costUSD"]
    summary = {
        "requests": 600,
        "cacheMinTokens": args.cache_min_tokens,
        "baselineUSD": baseline,
        "syncCachedUSD": out["sync_cached"]["costUSD"],
        "batchCachedUSD": out["batch_cached"]["costUSD"],
        "ratio_sync_cached": round(out["sync_cached"]["costUSD"] / baseline, 4),
        "ratio": round(out["batch_cached"]["costUSD"] / baseline, 4),
        "estimate_errors": {k: v["estimateError"] for k, v in out.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
