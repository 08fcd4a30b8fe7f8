"""What every cluster command shares, kubectl-style: `-n/--namespace`, `--kubeconfig`, `--context`,
and how a command talks and fails. `cluster_command` adds the three options to a command function
that takes a `ClusterOptions` first (the way kopf's CLI shares `logging_options`), so no command
lists them again.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from kubedistill import sdk
from kubedistill.errors import DistillerError, NotFound

EXIT_FAILED, EXIT_MISSING = 1, 2

Output = Annotated[str, typer.Option("--output", "-o", help="table, wide, json or yaml.")]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class ClusterOptions:
    namespace: str | None = None
    kubeconfig: str | None = None
    context: str | None = None

    def client(self) -> sdk.Distiller:
        return sdk.Distiller(namespace=self.namespace, kubeconfig=self.kubeconfig, context=self.context)


_CLUSTER_PARAMS = [
    inspect.Parameter(
        "namespace",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None, typer.Option("--namespace", "-n", help="Namespace (default: the context's).")
        ],
    ),
    inspect.Parameter(
        "kubeconfig",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[str | None, typer.Option("--kubeconfig", help="Path of the kubeconfig file.")],
    ),
    inspect.Parameter(
        "context",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[str | None, typer.Option("--context", help="Kubeconfig context to use.")],
    ),
]


def cluster_command(
    app: typer.Typer, name: str | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register `fn(opts: ClusterOptions, ...)` as a command that also takes the cluster options."""

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            opts = ClusterOptions(kwargs.pop("namespace"), kwargs.pop("kubeconfig"), kwargs.pop("context"))
            fn(opts, **kwargs)

        command.__signature__ = inspect.Signature([*own, *_CLUSTER_PARAMS])  # type: ignore[attr-defined]
        app.command(name)(command)
        return fn

    return register


@contextmanager
def errors() -> Iterator[None]:
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


def dump(obj: Any, output: str) -> bool:
    """Print obj as json/yaml when asked; whether it did."""
    if output == "json":
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        return True
    if output == "yaml":
        sys.stdout.write(yaml.safe_dump(obj, sort_keys=False))
        return True
    return False


def print_invalid(lines: list[str]) -> None:
    for line in lines:
        err_console.print(f"error: {line}", markup=False, highlight=False)
