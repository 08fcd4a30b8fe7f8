"""`kubedistill doctor`: list DistillationJobs that hold kubedistill's finalizer, and release them.

Exit codes: 0 nothing is stuck (or everything listed was released); 1 a job is stuck (being deleted,
finalizer still on after a minute) and was not released, or the cluster refused a call; 2 bad options.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from kubedistill import doctor, sdk
from kubedistill.cli.app import app
from kubedistill.cli.options import console, err_console
from kubedistill.settings import from_env

EXIT_STUCK = 1


@app.command("doctor")
def doctor_command(
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace", "-n", help="Look in this namespace (repeatable); default: every namespace."
        ),
    ] = None,
    release_finalizers: Annotated[
        bool,
        typer.Option(
            "--release-finalizers",
            help="Remove kubedistill's finalizer from every job listed. Artifact deletion is skipped (and "
            "said so) unless --delete-artifacts is given too, and then only for jobs already being deleted.",
        ),
    ] = False,
    delete_artifacts: Annotated[
        bool,
        typer.Option(
            "--delete-artifacts",
            help="With --release-finalizers: first delete the artifacts of jobs being deleted that ask for it "
            "(storage settings from KUBEDISTILL_* and AWS_* in the environment, as the operator's).",
        ),
    ] = False,
    stop_operator: Annotated[
        str | None,
        typer.Option(
            "--stop-operator",
            metavar="NAMESPACE/DEPLOYMENT",
            help="Scale the operator's Deployment to zero and wait for its pods first (the Helm pre-delete hook).",
        ),
    ] = None,
    kubeconfig: Annotated[
        str | None, typer.Option("--kubeconfig", help="Path of the kubeconfig file.")
    ] = None,
    context: Annotated[str | None, typer.Option("--context", help="Kubeconfig context to use.")] = None,
) -> None:
    """DistillationJobs holding kubedistill's finalizer with no operator to process them; --release-finalizers
    is the way out."""
    from kubernetes.client.exceptions import ApiException

    if delete_artifacts and not release_finalizers:
        err_console.print("error: --delete-artifacts only goes with --release-finalizers", markup=False)
        raise typer.Exit(2)
    deployment_namespace, _, deployment = (stop_operator or "").partition("/")
    if stop_operator and not (deployment_namespace and deployment):
        err_console.print(
            f"error: --stop-operator {stop_operator}: expected NAMESPACE/DEPLOYMENT", markup=False
        )
        raise typer.Exit(2)
    api = sdk.Distiller(kubeconfig=kubeconfig, context=context).api
    settings = from_env()
    try:
        if stop_operator:
            doctor.stop_deployment(api, deployment_namespace, deployment)
            _say(f"deployment {stop_operator}: no operator pod runs")
        bodies = doctor.list_jobs(api, namespace or [])
        now = datetime.now(UTC)
        held = doctor.held_jobs(bodies, settings)
        if not held:
            console.print("No DistillationJob holds the kubedistill.io/finalizer.")
            return
        if not release_finalizers:
            for h in held:
                _say(f"distillationjob {h.ref}: {doctor.diagnose(h, now)}")
            if any(doctor.diagnose(h, now).startswith("STUCK") for h in held):
                console.print("Run again with --release-finalizers to let them go.")
                raise typer.Exit(EXIT_STUCK)
            return
        for outcome in doctor.release_all(api, bodies, settings, delete=delete_artifacts, now=now):
            _print_outcome(outcome)
    except ApiException as err:
        err_console.print(f"Error from server ({err.status} {err.reason}): {err.body}", markup=False)
        raise typer.Exit(EXIT_STUCK) from None
    except (TimeoutError, ValueError) as err:
        err_console.print(f"error: {err}", markup=False)
        raise typer.Exit(EXIT_STUCK) from None


def _say(line: str) -> None:
    # One line per job, never wrapped or marked up: the Helm hook's log and scripts read it too.
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _print_outcome(outcome: doctor.Outcome) -> None:
    line = f"released distillationjob {outcome.held.ref}"
    if outcome.artifacts:
        line += f" — {'LEFT BEHIND: ' if outcome.left_behind else ''}{outcome.artifacts}"
    _say(line)
