"""estimate: the job's cost and size, counted on its whole dataset before anything is spent.

The operator gates generate on this stage's result (`StageResult.estimate` → `status.estimate`,
`budget.maxTeacherCostUSD` → BudgetExceeded); it never reads the dataset itself. Running as a
stage, the estimate reads the dataset with the job's own credentials, in the job's namespace.

Tokens are counted with the student's tokenizer when the student is a model directory on this
machine (local mode, a `file://` student: its chat template included), else with the teacher's
calibrated characters per token; nothing is downloaded to estimate. See `kubedistill.estimating`
for the streaming, the sampling and the invalid-row rule. Writes nothing but progress.json and
result.json (`details` is the full breakdown).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill.catalog import load_catalog
from kubedistill.estimating import estimate_dataset
from kubedistill_trainer.runtime import ProgressReporter

log = logging.getLogger(__name__)


def local_model_dir(model: str) -> Path | None:
    """The student's directory when it is on this machine and has a tokenizer; None otherwise."""
    parsed = urlparse(model)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif not parsed.scheme and model.startswith(("/", "./", "../")):
        path = Path(model)
    else:
        return None
    return path if (path / "tokenizer_config.json").is_file() else None


def local_tokenizer(model: str) -> Any:
    directory = local_model_dir(model)
    if directory is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def run(inv: StageInvocation) -> StageResult:
    spec = inv.spec
    progress = ProgressReporter(inv.stage_uri(), inv.stage)

    def report(read: int, total: int, lines: int) -> None:
        mb = 1024 * 1024
        progress.update(read, total, detail=f"{lines:,} rows read ({read / mb:,.1f} of {total / mb:,.1f} MB)")

    report(0, 0, 0)
    tokenizer = local_tokenizer(spec.student.model)
    found, counts = estimate_dataset(spec, load_catalog(), tokenizer=tokenizer, on_progress=report)
    e, breakdown = found.estimate, found.breakdown
    progress.update(1, 1, detail=f"{counts.valid + counts.rejected:,} rows read", force=True)
    counting = breakdown["counting"]
    how = (
        "every row counted"
        if counting["mode"] == "exact"
        else f"{counting['rowsCounted']:,} rows counted, ±{100 * counting['inputTokensMargin95']:.1f}% (95%)"
    )
    invalid = f"; {counts.rejected:,} invalid rows skipped" if counts.rejected else ""
    message = (
        f"{e.prompts:,} prompts, {e.input_tokens:,} input + {e.output_tokens:,} output tokens "
        f"({breakdown['tokenCounting']}, {how}), teacher ${e.teacher_cost_usd:.4f}{invalid}"
    )
    log.info("%s", message)
    return StageResult(stage=inv.stage, ok=True, message=message, estimate=e, details=breakdown)
