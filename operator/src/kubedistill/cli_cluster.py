"""The kubectl-like commands of `kubedistill`: apply, get/list, describe, wait, artifacts, logs, estimate,
models, alias, suspend/resume, delete. Every cluster command takes `-n/--namespace`, `--kubeconfig`
and `--context` like kubectl; all of them go through the `Distiller` SDK.

Exit codes: 0 ok; 1 an error (the server's message is printed) or, for `wait`, a Failed job; 2 a
missing object or a file that is not a valid job.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from kubedistill import sdk
from kubedistill.api.models import STAGES, Stage
from kubedistill.domain.phases import STAGE_WEIGHT
from kubedistill.errors import DistillerError, NotFound
from kubedistill.estimating import ProgressFn
from kubedistill.local import JobInvalid, load_job, with_dataset_path

EXIT_FAILED, EXIT_MISSING = 1, 2

Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's).")
]
Kubeconfig = Annotated[str | None, typer.Option("--kubeconfig", help="Path of the kubeconfig file.")]
Context = Annotated[str | None, typer.Option("--context", help="Kubeconfig context to use.")]
Output = Annotated[str, typer.Option("--output", "-o", help="table, wide, json or yaml.")]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


@contextmanager
def _errors() -> Iterator[None]:
    """Typed SDK errors → the server's message on stderr and kubectl-like exit codes."""
    try:
        yield
    except NotFound as err:
        err_console.print(f"Error from server (NotFound): {err.message}", markup=False, highlight=False)
        raise typer.Exit(EXIT_MISSING) from None
    except DistillerError as err:
        kind = type(err).__name__ if type(err) is not DistillerError else "Error"
        err_console.print(f"Error from server ({kind}): {err.message}", markup=False, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None


def _client(namespace: str | None, kubeconfig: str | None, context: str | None) -> sdk.Distiller:
    return sdk.Distiller(namespace=namespace, kubeconfig=kubeconfig, context=context)


def _dump(obj: Any, output: str) -> bool:
    """Print obj as json/yaml when asked; whether it did."""
    if output == "json":
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        return True
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(obj, sort_keys=False))
        return True
    return False


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


def _num(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def job_rows(objs: Sequence[Mapping[str, Any]], wide: bool = False) -> tuple[list[str], list[list[str]]]:
    """The printer columns of the DistillationJob CRD (kubectl get dj)."""
    header = ["NAME", "PHASE", "PROGRESS", "TEACHER", "STUDENT", "COST", "EVAL", "AGE"]
    if wide:
        header.append("MESSAGE")
    rows = []
    for obj in objs:
        s = sdk.summary(obj)
        row = [
            s["id"],
            s["phase"] or "",
            f"{s['progress']:.0f}%" if s["phase"] else "",
            s["teacher_model"] or "",
            s["student_model"] or "",
            _num(s["metrics"].get("teacherCostTotal"), 4),
            _num(s["metrics"].get("evalScore"), 3),
            age(s["created_at"]),
        ]
        if wide:
            row.append(s["message"] or "")
        rows.append(row)
    return header, rows


def _table(header: list[str], rows: list[list[str]], title: str | None = None) -> Table:
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


def _print_yaml_block(title: str, data: Mapping[str, Any] | None) -> None:
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
    prog = status.get("progress") or {}
    if prog:
        console.print(
            f"[bold]Progress:[/bold]   {prog.get('percent', 0):.0f}%"
            + (f" ({prog['stage']}: {prog.get('detail') or ''})" if prog.get("stage") else "")
        )
    conditions = status.get("conditions") or []
    if conditions:
        console.print(
            _table(
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
            _table(
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
    _print_yaml_block("Estimate", status.get("estimate"))
    _print_yaml_block("Metrics", status.get("metrics"))
    _print_yaml_block("Artifacts", status.get("artifacts"))
    events = job_events(d, name)
    if events:
        console.print(_table(["TYPE", "REASON", "AGE", "MESSAGE"], events, title="Events"))


def job_events(d: sdk.Distiller, name: str) -> list[list[str]]:
    from kubernetes.client.exceptions import ApiException

    try:
        found = d._core.list_namespaced_event(
            d.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=DistillationJob"
        ).items
    except ApiException:
        return []
    found.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
    return [
        [
            e.type or "",
            e.reason or "",
            age((e.last_timestamp or e.metadata.creation_timestamp).isoformat()),
            e.message or "",
        ]
        for e in found
    ]


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
        ["teacher cost", f"${result['teacher_cost']:.4f}"],
        ["judge cost", f"${result['judge_cost']:.4f} ({b['judge']})"],
        ["estimated cost", f"${result['estimated_cost']:.4f}"],
        ["GPU minutes", f"{result['gpu_minutes']:.2f} ({b['student']}, {b['studentParamsB']}B)"],
        ["fits budget", "yes" if result["sufficient"] else f"no (budget ${b['budgetUSD']})"],
    ]  # fmt: skip
    if b.get("priceNote"):
        rows.append(["note", b["priceNote"]])
    return _table(["", ""], rows)


def estimate_file(job_file: Path, on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """The offline estimate of a job file, counted on its dataset when it can be read from here: the
    same streaming code as the estimate stage, `on_progress` called while it reads."""
    from kubedistill.catalog import load_catalog
    from kubedistill.estimating import estimate_dataset

    job = load_job(job_file)
    spec = with_dataset_path(job.spec, job_file.parent)
    catalog = load_catalog()
    try:
        report, _ = estimate_dataset(spec, catalog, on_progress=on_progress)
    except Exception as err:  # a dataset in a ConfigMap or an unreachable bucket
        raise JobInvalid([f"spec.dataset: cannot read it from here to count tokens: {err}"]) from None
    return sdk.estimate_dict(report, catalog, spec.teacher.model)


@contextmanager
def reading_bar() -> Iterator[ProgressFn]:
    """A progress bar on stderr while a dataset is read (MB read of its size, rows so far)."""
    columns = (
        TextColumn("reading the dataset"),
        BarColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("read", total=None, note="")

        def update(read: int, total: int, rows: int) -> None:
            mb = 1024 * 1024
            note = f"{read / mb:,.1f}/{total / mb:,.1f} MB, {rows:,} rows"
            progress.update(task, completed=read, total=total or None, note=note)

        yield update


def register(app: typer.Typer) -> None:
    @app.command()
    def apply(
        filename: Annotated[
            Path, typer.Option("--filename", "-f", help="YAML with DistillationJobs/ModelAliases.")
        ],
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
    ) -> None:
        """Create or update the objects in a file; the API server validates them (same fields as local mode)."""
        try:
            docs = [doc for doc in yaml.safe_load_all(filename.read_text(encoding="utf-8")) if doc]
        except (OSError, yaml.YAMLError) as err:
            err_console.print(f"error: {filename}: {err}", markup=False)
            raise typer.Exit(EXIT_MISSING) from None
        d = _client(namespace, kubeconfig, context)
        with _errors():
            for doc in docs:
                obj, verb = d.apply_object(doc)
                console.print(f"{str(obj['kind']).lower()}.{sdk.GROUP}/{obj['metadata']['name']} {verb}")

    def _get(
        name: str | None, namespace: str | None, kubeconfig: str | None, context: str | None, output: str
    ) -> None:
        d = _client(namespace, kubeconfig, context)
        with _errors():
            objs = [d.raw(name)] if name else d.raw_list()
        if _dump(objs[0] if name else {"items": objs}, output):
            return
        if not objs:
            err_console.print(f"No resources found in {d.namespace} namespace.")
            return
        console.print(_table(*job_rows(objs, wide=output == "wide")))

    @app.command()
    def get(
        name: Annotated[str | None, typer.Argument(help="Job name; all jobs when omitted.")] = None,
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        output: Output = "table",
    ) -> None:
        """List DistillationJobs (or one) with the printer columns."""
        _get(name, namespace, kubeconfig, context, output)

    @app.command("list")
    def list_(
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        output: Output = "table",
    ) -> None:
        """List DistillationJobs."""
        _get(None, namespace, kubeconfig, context, output)

    @app.command()
    def describe(
        name: str, namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None
    ) -> None:
        """Conditions, stages, estimate, metrics, artifacts and events of a job."""
        with _errors():
            describe_job(_client(namespace, kubeconfig, context), name)

    @app.command()
    def wait(
        name: str,
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds; none by default.")] = None,
    ) -> None:
        """Follow a job until it ends: exit 0 Succeeded, 1 Failed, 2 no such job."""
        d = _client(namespace, kubeconfig, context)
        final: dict[str, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        with _errors():
            d.raw(name)  # a missing job: exit 2 before drawing anything
            progress = Progress(
                TextColumn("[bold]{task.description:<9}"),
                BarColumn(bar_width=30),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("[dim]{task.fields[note]}"),
                console=console,
            )
            with progress:
                bars = WaitBars(progress)
                for obj in d.watch(name, deadline):
                    bars.update(obj)
                    final = sdk.summary(obj)
                    if final["status"] in sdk.TERMINAL:
                        break
        if final.get("status") not in sdk.TERMINAL:
            err_console.print(
                f"error: distillationjob/{name} did not finish within {timeout} s", markup=False
            )
            raise typer.Exit(EXIT_FAILED)
        if final["status"] == "succeeded":
            console.print(f"distillationjob/{name} [green]Succeeded[/green]")
            return
        console.print(f"distillationjob/{name} [red]Failed[/red]: {escape(final.get('message') or '')}")
        raise typer.Exit(EXIT_FAILED)

    @app.command()
    def artifacts(
        name: str,
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        output: Output = "table",
    ) -> None:
        """Adapter, GGUF files and metrics of a job (the SDK's artifacts())."""
        with _errors():
            arts = _client(namespace, kubeconfig, context).artifacts(name)
        if _dump(arts, output):
            return
        rows = [["adapter", arts["adapter_path"] or ""], ["merged", arts["merged_path"] or ""]]
        rows += [[f"gguf {q}", uri] for q, uri in arts["gguf_paths"].items()]
        rows += [["eval", arts["eval_path"] or ""]]
        rows += [[k, "" if v is None else str(v)] for k, v in arts["metrics"].items()]
        console.print(_table(["ARTIFACT", "VALUE"], rows))

    @app.command()
    def logs(
        name: str,
        stage: Annotated[
            str, typer.Option("--stage", "-s", help="estimate, generate, curate, train, export or evaluate.")
        ],
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        tail: Annotated[int | None, typer.Option("--tail", help="Last lines only.")] = None,
    ) -> None:
        """Logs of the pod of the stage's latest Job."""
        if stage not in {s.value for s in Stage}:
            err_console.print(f"error: --stage must be one of {', '.join(s.value for s in Stage)}")
            raise typer.Exit(EXIT_MISSING)
        with _errors():
            sys.stdout.write(_client(namespace, kubeconfig, context).logs(name, stage, tail_lines=tail))

    @app.command("estimate")
    def estimate_command(
        filename: Annotated[Path, typer.Option("--filename", "-f", help="DistillationJob YAML.")],
        output: Output = "table",
    ) -> None:
        """Teacher cost and GPU minutes of a job file, offline, counted on its dataset."""
        try:
            with reading_bar() as on_progress:
                result = estimate_file(filename, on_progress)
        except JobInvalid as err:
            for line in err.lines:
                err_console.print(f"error: {line}", markup=False, highlight=False)
            raise typer.Exit(EXIT_MISSING) from None
        if not _dump(result, output):
            console.print(estimate_table(result))

    models = typer.Typer(help="The teacher and student catalogs.", no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("teachers")
    def teachers(output: Output = "table") -> None:
        """Teachers with their OpenAI-compatible base URLs and prices per million tokens."""
        found = sdk.Distiller().teacher_models()
        if not _dump(found, output):
            rows = [
                [
                    t["id"],
                    t["provider"] or "",
                    f"{t['input_per_m_tok']:g}",
                    f"{t['output_per_m_tok']:g}",
                    t["price_date"],
                    t["base_url"] or "",
                ]
                for t in found
            ]
            console.print(_table(["ID", "PROVIDER", "IN $/M", "OUT $/M", "PRICED", "BASE URL"], rows))

    @models.command("students")
    def students(output: Output = "table") -> None:
        """Students with their Hugging Face ids, size, minimum VRAM and typical training time."""
        found = sdk.Distiller().student_models()
        if not _dump(found, output):
            rows = [
                [
                    s["id"],
                    s["hf_id"],
                    s["params"],
                    f"{s['min_vram_gb']:g} GB",
                    f"{s['typical_training_minutes']:g} min",
                ]
                for s in found
            ]
            console.print(_table(["ID", "HUGGING FACE", "PARAMS", "MIN VRAM", "TRAINING"], rows))

    alias = typer.Typer(help="ModelAliases: what model=<alias> resolves to.", no_args_is_help=True)
    app.add_typer(alias, name="alias")

    def _alias_table(view: Mapping[str, Any]) -> Table:
        rows = [
            ["alias", view["id"]],
            ["target", json.dumps(view["target"])],
            ["gguf", view["gguf_path"] or ""],
            ["adapter", view["adapter_path"] or ""],
            ["model", view["model"] or ""],
            ["ready", f"{view['ready']} {view['message'] or ''}".strip()],
            ["history", "; ".join(json.dumps(h) for h in view["history"])],
        ]
        return _table(["", ""], rows)

    @alias.command("set")
    def alias_set(
        name: str,
        job: Annotated[
            str | None, typer.Option("--job", help="Serve this DistillationJob's student.")
        ] = None,
        gguf: Annotated[str | None, typer.Option("--gguf", help="Explicit GGUF URI.")] = None,
        adapter: Annotated[str | None, typer.Option("--adapter", help="Explicit LoRA adapter URI.")] = None,
        base_model: Annotated[
            str | None, typer.Option("--base-model", help="Base model of the adapter.")
        ] = None,
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        output: Output = "table",
    ) -> None:
        """Create the alias or re-point it."""
        with _errors():
            view = _client(namespace, kubeconfig, context).register_model(
                name, adapter_path=adapter, gguf_path=gguf, base_model=base_model, distillation_job=job
            )
        if not _dump(view, output):
            console.print(_alias_table(view))

    @alias.command("get")
    def alias_get(
        name: str,
        namespace: Namespace = None,
        kubeconfig: Kubeconfig = None,
        context: Context = None,
        output: Output = "table",
    ) -> None:
        """Where the alias points now, and its history."""
        with _errors():
            view = _client(namespace, kubeconfig, context).alias(name)
        if not _dump(view, output):
            console.print(_alias_table(view))

    @alias.command("rollback")
    def alias_rollback(
        name: str, namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None
    ) -> None:
        """Point the alias back at its previous target."""
        with _errors():
            view = _client(namespace, kubeconfig, context).rollback_alias(name)
        console.print(f"modelalias/{name} rolled back to {json.dumps(view['target'])}")

    def _simple(verb: str, action: Callable[[sdk.Distiller, str], Any], doc: str) -> Callable[..., None]:
        def command(
            name: str, namespace: Namespace = None, kubeconfig: Kubeconfig = None, context: Context = None
        ) -> None:
            with _errors():
                action(_client(namespace, kubeconfig, context), name)
            console.print(f"distillationjob.{sdk.GROUP}/{name} {verb}")

        command.__doc__ = doc
        return command

    app.command("suspend")(
        _simple("suspended", lambda d, n: d.cancel(n), "Stop the running stage; start nothing new.")
    )
    app.command("resume")(_simple("resumed", lambda d, n: d.resume(n), "Let a suspended job go on."))
    app.command("delete")(
        _simple(
            "deleted",
            lambda d, n: d.delete(n),
            "Delete a job (its artifacts stay unless storage says otherwise).",
        )
    )
