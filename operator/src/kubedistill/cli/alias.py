"""`kubedistill alias set|get|rollback`: what `model=<alias>` resolves to; `kubedistill chat`: ask it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.table import Table

from kubedistill.cli.app import app
from kubedistill.cli.options import (
    ClusterOptions,
    Output,
    cluster_command,
    console,
    dump,
    err_console,
    errors,
)
from kubedistill.cli.render import table
from kubedistill.errors import DistillerError
from kubedistill.sdk.chat import chat

alias_app = typer.Typer(help="ModelAliases: what model=<alias> resolves to.", no_args_is_help=True)
app.add_typer(alias_app, name="alias")


def _history_entry(state: Mapping[str, Any]) -> str:
    """A serving state (a history entry, or the alias now) as one line: the target, and the canary if any."""
    text = json.dumps(state["target"])
    canary = state.get("canary")
    return f"{text} + canary {json.dumps(canary)}" if canary else text


def _served(view: Mapping[str, Any]) -> str:
    return "; ".join(
        f"{s['role']} {s['weight']}% → {s['deployment_id']} ({s['ready_replicas']} ready)"
        for s in view["served"]
    )


def alias_table(view: Mapping[str, Any]) -> Table:
    endpoint = view.get("endpoint") or {}
    progress = view.get("progress_reason") or ""
    if view.get("progress_message"):
        progress = f"{progress}: {view['progress_message']}"
    rows = [
        ["alias", view["id"]],
        ["target", json.dumps(view["target"])],
        ["canary", json.dumps(view["canary"]) if view.get("canary") else ""],
        ["fallback", json.dumps(view["fallback"]) if view.get("fallback") else ""],
        ["endpoint", f"{endpoint.get('url')}  model={endpoint.get('model')}" if endpoint else ""],
        ["served", _served(view)],
        ["gguf", view["gguf_path"] or ""],
        ["adapter", view["adapter_path"] or ""],
        ["model", view["model"] or ""],
        ["ready", f"{view['ready']} {view['message'] or ''}".strip()],
        ["progressing", f"{view.get('progressing', False)} {progress}".strip()],
        ["history", "; ".join(_history_entry(h) for h in view["history"])],
    ]
    return table(["", ""], rows)


@cluster_command(alias_app, "set")
def alias_set(
    opts: ClusterOptions,
    name: str,
    job: Annotated[str | None, typer.Option("--job", help="Serve this DistillationJob's student.")] = None,
    gguf: Annotated[str | None, typer.Option("--gguf", help="Explicit GGUF URI.")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Explicit LoRA adapter URI.")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", help="Base model of the adapter.")] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="A provider model instead, e.g. openai/gpt-4o.")
    ] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="The provider's base URL.")] = None,
    api_key_secret: Annotated[
        str | None, typer.Option("--api-key-secret", help="SECRET/KEY holding the provider's API key.")
    ] = None,
    canary: Annotated[
        int | None,
        typer.Option(
            "--canary", min=0, max=100, help="Make this target the canary, with this percent of requests."
        ),
    ] = None,
    fallback_provider: Annotated[
        str | None,
        typer.Option("--fallback-provider", help="Provider model taking requests the target fails."),
    ] = None,
    output: Output = "table",
) -> None:
    """Create the alias or re-point it (or give it a canary or a fallback)."""
    with errors():
        view = opts.client().register_model(
            name,
            adapter_path=adapter,
            gguf_path=gguf,
            base_model=base_model,
            distillation_job=job,
            provider=provider,
            base_url=base_url,
            api_key_secret=api_key_secret,
            canary_weight=canary,
            fallback_provider=fallback_provider,
        )
    if not dump(view, output):
        console.print(alias_table(view))


@cluster_command(alias_app, "get")
def alias_get(opts: ClusterOptions, name: str, output: Output = "table") -> None:
    """Where the alias points now, and its history."""
    with errors():
        view = opts.client().alias(name)
    if not dump(view, output):
        console.print(alias_table(view))


@cluster_command(alias_app, "rollback")
def alias_rollback(opts: ClusterOptions, name: str) -> None:
    """Restore the alias's previous serving state: its target, and its canary or none."""
    with errors():
        view = opts.client().rollback_alias(name)
    console.print(f"modelalias/{name} rolled back to {_history_entry(view)}")


@cluster_command(app, "chat")
def chat_command(
    opts: ClusterOptions,
    alias: str,
    prompt: str,
    gateway_url: Annotated[
        str | None,
        typer.Option(
            "--gateway-url",
            help="The gateway's base URL, e.g. http://localhost:4000/v1 after `kubectl port-forward`; "
            "defaults to the alias's status.endpoint.url (reachable from inside the cluster).",
        ),
    ] = None,
    api_key_env: Annotated[
        str, typer.Option("--api-key-env", help="Environment variable holding the gateway's master key.")
    ] = "KUBEDISTILL_GATEWAY_KEY",
) -> None:
    """Send one request with model=<alias> through the gateway; print the answer and who gave it."""
    with errors():
        url = gateway_url
        if url is None:
            endpoint = opts.client().alias(alias).get("endpoint") or {}
            url = endpoint.get("url")
            if not url:
                raise DistillerError(f"ModelAlias {alias} has no endpoint yet: is the operator's gateway on?")
        reply = chat(url, alias, prompt, api_key=os.environ.get(api_key_env))
    console.print(reply.text, markup=False, highlight=False)
    err_console.print(
        f"model={alias} answered by {reply.deployment_id or reply.model} in {reply.seconds:.2f}s",
        markup=False,
        highlight=False,
    )
