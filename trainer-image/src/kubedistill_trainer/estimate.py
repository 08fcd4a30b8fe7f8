"""estimate: the job's cost and size, counted on its whole dataset before anything is spent.

The operator gates generate on this stage's result (`StageResult.estimate` → `status.estimate`,
`budget.maxTeacherCostUSD` → BudgetExceeded); it never reads the dataset itself. Running as a
stage, the estimate reads the dataset with the job's own credentials, in the job's namespace.

Tokens are counted with the student's tokenizer when the student is a model directory on this
machine (local mode, a `file://` student: its chat template included), else with the teacher's
calibrated characters per token; nothing is downloaded to estimate. A directory with a
`tokenizer.json` is read by `tokenizers` and its chat template rendered by jinja2 the way
transformers renders it (`LightTokenizer`): importing transformers imports torch, which would
take the stage from ~60 MB to ~600 MB for counting alone. See `kubedistill.estimating`
for the streaming, the sampling and the invalid-row rule. Writes nothing but progress.json and
result.json (`details` is the full breakdown).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kubedistill.api.stage import StageInvocation, StageResult
from kubedistill.catalog import load_catalog
from kubedistill.estimating import estimate_dataset
from kubedistill.traffic import traffic_summary
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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        return str(value.get("content")) if value.get("content") is not None else None
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise ValueError(message)


class LightTokenizer:
    """The counting half of a Hugging Face tokenizer, without transformers: `encode` through the
    `tokenizers` library, `apply_chat_template` through jinja2 configured as transformers does
    (sandboxed, trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`)."""

    def __init__(self, directory: Path) -> None:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: the default one renders a conversation
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self._special = {
            k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template) if template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str:
        assert self._template is not None and not tokenize
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special
        )


def local_tokenizer(model: str) -> Any:
    directory = local_model_dir(model)
    if directory is None:
        return None
    if (directory / "tokenizer.json").is_file():
        return LightTokenizer(directory)
    # A slow (SentencePiece-only) tokenizer has no tokenizer.json: transformers converts it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def run(inv: StageInvocation) -> StageResult:
    spec = inv.spec
    progress = ProgressReporter(inv.stage_uri(), inv.stage)

    def report(read: int, total: int, lines: int) -> None:
        # In percent of the bytes: local mode's bar shows done/total, and a byte count reads badly.
        mb = 1024 * 1024
        progress.update(
            round(100 * read / total) if total else 0,
            100,
            detail=f"{lines:,} rows read ({read / mb:,.1f} of {total / mb:,.1f} MB)",
        )

    report(0, 0, 0)
    tokenizer = local_tokenizer(spec.student.model)
    found, counts = estimate_dataset(spec, load_catalog(), tokenizer=tokenizer, on_progress=report)
    e, breakdown = found.estimate, found.breakdown
    progress.update(100, 100, detail=f"{counts.valid + counts.rejected:,} rows read", force=True)
    counting = breakdown["counting"]
    how = (
        "every row counted"
        if counting["mode"] == "exact"
        else f"{counting['rowsCounted']:,} rows counted, ±{100 * counting['inputTokensMargin95']:.1f}% (95%)"
    )
    invalid = f"; {counts.rejected:,} invalid rows skipped" if counts.rejected else ""
    if e.traffic is not None:
        invalid += f"; {traffic_summary(e.traffic)}"
    message = (
        f"{e.prompts:,} prompts, {e.input_tokens:,} input + {e.output_tokens:,} output tokens "
        f"({breakdown['tokenCounting']}, {how}), teacher ${e.teacher_cost_usd:.4f}{invalid}"
    )
    log.info("%s", message)
    return StageResult(stage=inv.stage, ok=True, message=message, estimate=e, details=breakdown)
