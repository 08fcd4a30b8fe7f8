"""`kubedistill serve`: after a local run, the student answers `model=<alias>` on loopback (local.serve)."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kubedistill.cli.app import app
from kubedistill.cli.options import EXIT_FAILED, err_console
from kubedistill.local.serve import ServeError, curl_command, serve, trained_gguf


@app.command("serve")
def serve_command(
    job_file: Annotated[
        Path | None, typer.Argument(help="The DistillationJob YAML a local run trained (its GGUF is served).")
    ] = None,
    workdir: Annotated[Path, typer.Option("--workdir", help="The local run's workdir.")] = Path(".work"),
    alias: Annotated[str, typer.Option("--alias", help="The model name to answer to.")] = "smart",
    gguf: Annotated[Path | None, typer.Option("--gguf", help="Serve this GGUF instead of the job's.")] = None,
    quantization: Annotated[
        str | None, typer.Option("--quantization", help="Which exported GGUF (default: the first).")
    ] = None,
    port: Annotated[int, typer.Option("--port", help="The gateway's port on 127.0.0.1.")] = 4000,
    fallback: Annotated[
        str | None, typer.Option("--fallback-provider", help="Provider model taking failed requests.")
    ] = None,
    fallback_url: Annotated[str | None, typer.Option("--fallback-url", help="Its base URL.")] = None,
) -> None:
    """Serve a locally trained student: llama-server + the LiteLLM gateway on loopback, until Ctrl-C."""
    try:
        if gguf is None:
            if job_file is None:
                raise ServeError("name the job file (or --gguf PATH)")
            gguf = trained_gguf(job_file, workdir, quantization)
        with serve(gguf, alias, workdir, port, fallback, fallback_url) as serving:
            console = Console()
            console.print(f"[green]serving[/green] {gguf.name} as model={alias}")
            console.print(f"gateway (LiteLLM): {serving.gateway_url}   llama-server: {serving.server_url}")
            console.print(f"config: {serving.config_path}; logs beside it. Try:\n")
            print(curl_command(serving, alias), flush=True)
            console.print("\nCtrl-C stops both.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except ServeError as err:
        err_console.print(f"error: {err}", markup=False, highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
