"""How cluster objects look on a terminal: kubectl-like tables, ages, the wait bars, describe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml
from rich.progress import Progress, TaskID
from rich.table import Table
from rich.text import Text

from kubedistill import sdk
from kubedistill.api.models import STAGES, Stage
from kubedistill.cli.options import console
from kubedistill.domain.progress import STAGE_WEIGHT


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's age: 45s, 12m, 3h, 2d."""
    if not timestamp:
        return "<unknown>"
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(0, seconds)}s"


def num(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def job_rows(objs: Sequence[Mapping[str, Any]], wide: bool = False) -> tuple[list[str], list[list[str]]]:
    """The printer columns of the DistillationJob CRD (kubectl get dj)."""
    header = ["NAME", "PHASE", "PROGRESS", "QUEUED", "TEACHER", "STUDENT", "COST", "EVAL", "AGE"]
    if wide:
        header.append("MESSAGE")
    rows = []
    for obj in objs:
        s = sdk.summary(obj)
        row = [
            s["id"],
            s["phase"] or "",
            f"{s['progress']:.0f}%" if s["phase"] else "",
            _queued(obj),
            s["teacher_model"] or "",
            s["student_model"] or "",
            num(s["metrics"].get("teacherCostTotal"), 4),
            num(s["metrics"].get("evalScore"), 3),
            age(s["created_at"]),
        ]
        if wide:
            row.append(s["message"] or "")
        rows.append(row)
    return header, rows


def _queued(obj: Mapping[str, Any]) -> str:
    """The Queued condition's status (Kueue holds the current stage), blank without a queue."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c.get("status", "") for c in conditions if c.get("type") == "Queued"), "")


def table(header: list[str], rows: list[list[str]], title: str | None = None) -> Table:
    table = Table(*header, box=None, title=title, title_justify="left", header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # server text is never markup
    return table


def stage_fraction(stage: Stage, percent: float) -> float:
    """How far one stage is, from the whole-pipeline percent (the operator's stage weights)."""
    before = sum(STAGE_WEIGHT[s] for s in STAGES[: STAGES.index(stage)])
    return max(0.0, min(1.0, (percent - before) / STAGE_WEIGHT[stage]))


class WaitBars:
    """Per-stage bars driven by the job's status as a watch delivers it."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[Stage, TaskID] = {s: progress.add_task(s.value, total=100, note="") for s in STAGES}

    def update(self, obj: Mapping[str, Any]) -> None:
        status = obj.get("status") or {}
        states = {s.get("name"): s for s in status.get("stages") or []}
        prog = status.get("progress") or {}
        for stage, task in self.tasks.items():
            entry = states.get(stage.value, {})
            state = entry.get("state", "Pending")
            if state in ("Succeeded", "Skipped"):
                done = 100.0
            elif prog.get("stage") == stage.value:
                done = 100 * stage_fraction(stage, float(prog.get("percent") or 0.0))
            else:
                done = 0.0
            note = state
            if prog.get("stage") == stage.value and prog.get("detail"):
                note = f"{state}: {prog['detail']}"
            elif state == "Failed" and entry.get("message"):
                note = f"Failed: {entry['message']}"
            self.progress.update(task, completed=done, note=note)


def print_yaml_block(title: str, data: Mapping[str, Any] | None) -> None:
    if data:
        console.print(f"[bold]{title}:[/bold]")
        console.print(yaml.safe_dump(dict(data), sort_keys=False).rstrip(), markup=False, highlight=False)


def describe_job(d: sdk.Distiller, name: str) -> None:
    obj = d.raw(name)
    meta, spec, status = obj["metadata"], obj.get("spec", {}), obj.get("status") or {}
    console.print(f"[bold]Name:[/bold]       {meta['name']}")
    console.print(f"[bold]Namespace:[/bold]  {meta.get('namespace')}")
    console.print(
        f"[bold]Created:[/bold]    {meta.get('creationTimestamp')} ({age(meta.get('creationTimestamp'))} ago)"
    )
    console.print(f"[bold]Phase:[/bold]      {status.get('phase') or 'Pending'}")
    console.print(f"[bold]Teacher:[/bold]    {spec.get('teacher', {}).get('model')}")
    console.print(f"[bold]Student:[/bold]    {spec.get('student', {}).get('model')}")
    if spec.get("queueName"):
        console.print(f"[bold]Queue:[/bold]      {spec['queueName']} (Kueue LocalQueue)")
    prog = status.get("progress") or {}
    if prog:
        console.print(
            f"[bold]Progress:[/bold]   {prog.get('percent', 0):.0f}%"
            + (f" ({prog['stage']}: {prog.get('detail') or ''})" if prog.get("stage") else "")
        )
    conditions = status.get("conditions") or []
    if conditions:
        console.print(
            table(
                ["TYPE", "STATUS", "REASON", "MESSAGE", "SINCE"],
                [
                    [
                        c["type"],
                        c["status"],
                        c.get("reason", ""),
                        c.get("message", ""),
                        age(c.get("lastTransitionTime")),
                    ]
                    for c in conditions
                ],
                title="Conditions",
            )
        )
    stages = status.get("stages") or []
    if stages:
        console.print(
            table(
                ["STAGE", "STATE", "ATTEMPTS", "JOB", "MESSAGE"],
                [
                    [
                        s["name"],
                        s.get("state", ""),
                        str(s.get("attempts", 0)),
                        s.get("jobName") or "",
                        s.get("message") or "",
                    ]
                    for s in stages
                ],
                title="Stages",
            )
        )
    print_yaml_block("Estimate", status.get("estimate"))
    print_yaml_block("Metrics", status.get("metrics"))
    print_yaml_block("Artifacts", status.get("artifacts"))
    events = [[e["type"], e["reason"], age(e["time"]), e["message"]] for e in d.events(name)]
    if events:
        console.print(table(["TYPE", "REASON", "AGE", "MESSAGE"], events, title="Events"))


def _counting(counting: Mapping[str, Any]) -> str:
    if counting["mode"] == "exact":
        return f"every row of {counting['rows']:,}"
    return (
        f"{counting['rowsCounted']:,} of {counting['rows']:,} rows, ±{100 * counting['inputTokensMargin95']:.1f}% "
        "(95%)"
    )


def estimate_table(result: Mapping[str, Any]) -> Table:
    b = result["breakdown"]
    rows = [
        ["teacher", f"{b['teacher']} (${b['pricePerMTok']['input']}/${b['pricePerMTok']['output']} per M tokens, "
         f"prices of {b['priceDate'] or 'unknown date'})"],
        ["teacher calls", str(result["teacher_calls"])],
        ["input / output tokens", f"{result['input_tokens']:,} / {result['output_tokens']:,} "
         f"(output from {b['outputTokensFrom']}, counted by {b['tokenCounting']}, {_counting(b['counting'])})"],
        ["teacher cost", f"${result['teacher_cost']:.4f} ({b['teacherMode']}, {result['cached_input_tokens']:,} input "
         f"tokens from the provider's cache; ${b['teacherCostAtSyncPriceUSD']:.4f} at sync prices)"],
        ["judge cost", f"${result['judge_cost']:.4f} ({b['judge']})"],
        ["estimated cost", f"${result['estimated_cost']:.4f}"],
        ["GPU minutes", f"{result['gpu_minutes']:.2f} ({b['student']}, {b['studentParamsB']}B)"],
        ["scale-out", f"training on {result['train_nodes']} node(s) × "
         f"{result['train_processes_per_node'] or 'default'} GPUs/processes; generation in {result['generation_shards']} shard(s)"],
        ["fits budget", "yes" if result["sufficient"] else f"no (budget ${b['budgetUSD']})"],
    ]  # fmt: skip
    if b.get("priceNote"):
        rows.append(["note", b["priceNote"]])
    return table(["", ""], rows)
