"""`kubedistill run JOB.yaml --local`: local mode with a live progress bar per stage and a summary."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from kubedistill.api.jobfile import JobInvalid
from kubedistill.api.models import Stage
from kubedistill.api.stage import StageProgress
from kubedistill.cli.app import app
from kubedistill.cli.options import err_console, print_invalid
from kubedistill.local.runner import LocalRun, RunState
from kubedistill.machine import line

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(seconds), 60)
    return f"ETA {minutes}:{secs:02d}"


class StageBars:
    """One rich task per stage, fed from the stage's progress.json."""

    def __init__(self, progress: Progress, stages: list[Stage]) -> None:
        self.progress = progress
        self.tasks: dict[Stage, TaskID] = {
            s: progress.add_task(s.value, total=None, start=False, cost="", loss="", eta="", note="waiting")
            for s in stages
        }

    def update(self, stage: Stage, p: StageProgress | None, state: str) -> None:
        task = self.tasks[stage]
        fields: dict[str, Any] = {"note": state}
        if state == "running" and not self.progress.tasks[task].started:
            self.progress.start_task(task)
        if p is not None:
            fields |= {
                "cost": f"${p.cost_usd:.4f}" if p.cost_usd else "",
                "loss": f"loss {p.loss:.3f}" if p.loss is not None else "",
                "eta": _eta(p.eta_seconds) if state == "running" else "",
                "note": f"{state}: {p.detail}" if p.detail and state == "running" else state,
            }
            if p.total:
                self.progress.update(task, total=p.total, completed=p.done)
        if state in ("done", "done earlier"):
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, total=total, completed=total)
            self.progress.stop_task(task)
        self.progress.update(task, **fields)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(bar_width=28),
        MofNCompleteColumn(),
        TextColumn("{task.fields[cost]}"),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.fields[note]}"),
        console=console,
        refresh_per_second=4,
    )


def artifact_paths(state: RunState) -> list[tuple[str, str]]:
    """(what, local path) of every artifact the stages reported."""
    out: list[tuple[str, str]] = []
    for outcome in state.outcomes.values():
        if outcome.result is None:
            continue
        for key, value in outcome.result.artifacts.to_k8s().items():
            values = value.items() if isinstance(value, dict) else [("", value)]
            for sub, uri in values:
                label = key.removesuffix("URI").removesuffix("URIs") + (f" {sub}" if sub else "")
                out.append((label, uri.removeprefix("file://")))
    return out


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "–"
    if kind == "usd":
        return f"${value:.4f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "s":
        return f"{value:.0f} s"
    if kind == "sec":
        return f"{value:.3g} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_rows(f: Mapping[str, Any]) -> list[tuple[str, str]]:
    judge = f.get("judge") or "judge"
    rows = f.get("heldOutRows")
    return [
        ("teacher calls / cost", f"{_fmt(f['teacherCalls'])} / {_fmt(f['teacherCostUSD'], 'usd')}"
         f" (estimated {_fmt(f['estimatedCostUSD'], 'usd')})"),
        ("teacher tokens in / out",
         f"{_fmt(f['teacherInputTokens'])} / {_fmt(f['teacherOutputTokens'])}"
         f" (estimated {_fmt(f['estimatedInputTokens'])} / {_fmt(f['estimatedOutputTokens'])})"),
        (f"teacher input from its cache / saved ({f['teacherMode'] or 'sync'})",
         f"{_fmt(f['teacherCachedInputTokens'])} (estimated {_fmt(f['estimatedCachedInputTokens'])})"
         f" / {_fmt(f['teacherSavingUSD'] or 0.0, 'usd')}"),
        ("candidates kept by curation", f"{_fmt(f['curated'])} of {_fmt(f['candidates'])}"),
        ("final BOND loss / training time", f"{_fmt(f['lossFinal'])} / {_fmt(f['trainingTimeSec'], 's')}"),
        (f"teacher score ({judge}, {_fmt(rows)} held-out rows)", _fmt(f["teacherScore"], "pct")),
        ("student before training", _fmt(f["studentBefore"], "pct")),
        ("student after training", _fmt(f["studentAfter"], "pct")),
        ("retention (after / teacher)", _fmt(f["retention"], "pct")),
        ("student gives the teacher's answer", _fmt(f["agreementWithTeacher"], "pct")),
        ("tokens per call, teacher (prompt / answer)",
         f"{_fmt(f['teacherPromptTokensPerCall'])} / {_fmt(f['teacherAnswerTokensPerCall'])}"),
        ("tokens per call, student (prompt / answer)",
         f"{_fmt(f['studentPromptTokensPerCall'])} / {_fmt(f['studentAnswerTokensPerCall'])}"),
        ("latency per call p50 / p95, teacher",
         f"{_fmt(f['teacherLatencyP50Sec'], 'sec')} / {_fmt(f['teacherLatencyP95Sec'], 'sec')}"),
        ("latency per call p50 / p95, student",
         f"{_fmt(f['studentLatencyP50Sec'], 'sec')} / {_fmt(f['studentLatencyP95Sec'], 'sec')}"),
        ("llama.cpp prompt / decode tokens/s, teacher", _rates(f, "teacher")),
        ("llama.cpp prompt / decode tokens/s, student", _rates(f, "student")),
        ("wall time (all runs of this job)", _fmt(f["wallTimeSec"], "s")),
        ("measured on", line(f["machine"]) if f.get("machine") else "–"),
    ]  # fmt: skip


def _rates(f: Mapping[str, Any], who: str) -> str:
    prompt, decode = f.get(f"{who}PromptTokensPerSecond"), f.get(f"{who}DecodeTokensPerSecond")
    if prompt is None and decode is None:
        why = "its server reports no llama.cpp timings" if who == "teacher" else "not served by llama.cpp"
        return f"– ({why})"
    return f"{_fmt(prompt)} / {_fmt(decode)}"


def _summary(console: Console, run: LocalRun, state: RunState) -> None:
    table = Table(title=f"{run.name}: summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for what, value in summary_rows(run.figures):
        table.add_row(Text(what), Text(value))
    console.print(table)
    arts = Table(title=f"artifacts in {run.dir}", show_header=False, title_justify="left")
    arts.add_column("what", style="bold")
    arts.add_column("where")
    for what, where in artifact_paths(state):
        arts.add_row(Text(what), Text(where.removeprefix(f"{run.dir}/")))
    console.print(arts)


def run_local(
    job_file: Path,
    workdir: Path,
    preset: str | None = None,
    fresh: bool = False,
    console: Console | None = None,
) -> int:
    console = console or Console()
    try:
        run = LocalRun(job_file=job_file, workdir=workdir, preset=preset)
    except JobInvalid as err:
        print_invalid(err.lines)
        return EXIT_INVALID
    if fresh and run.dir.exists():
        shutil.rmtree(run.dir)
    console.print(f"[bold]{run.name}[/bold] locally → {run.dir}" + (f" (preset {preset})" if preset else ""))

    interrupts = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        run.stop = True
        if interrupts > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with _progress(console) as progress:
            bars = StageBars(progress, run.stages())
            state = run.execute(bars.update, lambda note: progress.console.print(note))
    except JobInvalid as err:
        print_invalid(err.lines)
        return EXIT_INVALID
    except RuntimeError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)

    failed = [o for o in state.outcomes.values() if o.result is not None and not o.result.ok]
    if state.interrupted:
        console.print("[yellow]stopped: what was produced is kept; run the same command again to resume")
        return EXIT_INTERRUPTED
    _summary(console, run, state)
    if failed:
        r = failed[0].result
        assert r is not None
        console.print(f"[red]stage {r.stage.value} failed[/red] ({r.reason}): {escape(r.message)}")
        console.print(f"log: {run.local_dir / 'logs' / (r.stage.value + '.log')}")
        return EXIT_FAILED
    console.print(f"[green]done[/green]; figures in {run.local_dir / 'summary.json'}")
    return EXIT_OK


@app.command("run")
def run_command(
    job_file: Annotated[Path, typer.Argument(help="DistillationJob YAML, the same the operator takes.")],
    local: Annotated[
        bool, typer.Option("--local", help="Run on this machine (the only mode so far).")
    ] = False,
    workdir: Annotated[Path, typer.Option("--workdir", help="Where artifacts are kept.")] = Path(".work"),
    preset: Annotated[
        str | None, typer.Option("--preset", help="smoke: tiny model, scripted teacher, few steps (CI).")
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Forget earlier results of this job.")] = False,
) -> None:
    """Run a DistillationJob locally: the same stages as in the cluster, as child processes."""
    if not local:
        typer.echo("error: `run` needs --local; in a cluster use `kubedistill apply -f JOB.yaml`", err=True)
        raise typer.Exit(EXIT_INVALID)
    raise typer.Exit(run_local(job_file, workdir, preset, fresh))
