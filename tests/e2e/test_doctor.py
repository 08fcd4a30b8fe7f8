"""`kubedistill doctor` on the real control plane with no operator running: what an operator of an older
version (or a crashed one) leaves behind is listed, then released, deleting a deleted job's artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from sdk_cli_support import job_body
from typer.testing import CliRunner

from conftest import wait_for
from kubedistill.cli import app
from kubedistill.domain.deletion import FINALIZER

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubedistill.io", "v1alpha1", "distillationjobs"
runner = CliRunner()


def held(name: str, **spec: Any) -> dict[str, Any]:
    """A job as an operator that puts its finalizer on every job leaves it."""
    body = job_body(name, **spec)
    body["metadata"]["finalizers"] = [FINALIZER]
    return body


def exists(custom: client.CustomObjectsApi, namespace: str, name: str) -> bool:
    try:
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def test_doctor_lists_the_held_jobs_and_releases_them(
    control_plane: Path,
    namespace: str,
    k8s_api: client.ApiClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    custom = client.CustomObjectsApi(k8s_api)
    root = tmp_path / "artifacts"
    monkeypatch.setenv("KUBEDISTILL_ARTIFACT_ROOT", root.as_uri())
    cleans = {"deleteOnJobDeletion": True}
    for body in (
        held("stale"),
        held("deleted", storage=cleans),
        held("live", storage=cleans),
        job_body("free"),
    ):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    uid = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "deleted")["metadata"]["uid"]
    artifact = root / namespace / "deleted" / uid / "train" / "adapter.safetensors"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"weights")
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "deleted")
    assert exists(custom, namespace, "deleted")  # held by the finalizer: no operator runs

    kube = ["-n", namespace, "--kubeconfig", str(control_plane)]
    listing = runner.invoke(app, ["doctor", *kube])
    assert listing.exit_code == 0, listing.output
    lines = {line.split(":")[0].split("/")[1]: line for line in listing.output.splitlines()}
    assert sorted(lines) == ["deleted", "live", "stale"]  # "free" carries no finalizer
    assert "being deleted for" in lines["deleted"] and "deleteOnJobDeletion" in lines["deleted"]
    assert "not needed" in lines["stale"]

    refused = runner.invoke(app, ["doctor", *kube, "--delete-artifacts"])
    assert refused.exit_code == 2 and "only goes with --release-finalizers" in refused.output

    released = runner.invoke(app, ["doctor", *kube, "--release-finalizers", "--delete-artifacts"])
    assert released.exit_code == 0, released.output
    out = " ".join(released.output.split())
    assert f"released distillationjob {namespace}/deleted — deleted 1 artifact object(s)" in out
    assert f"released distillationjob {namespace}/live — LEFT BEHIND: artifacts at {root.as_uri()}" in out
    assert f"released distillationjob {namespace}/stale" in out
    wait_for(lambda: not exists(custom, namespace, "deleted"), what="the released job to be deleted")
    assert not artifact.exists()
    for name in ("live", "stale"):
        got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        assert FINALIZER not in (got["metadata"].get("finalizers") or [])
    events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    left = [e for e in events if e.reason == "ArtifactsLeftBehind"]
    assert [e.involved_object.name for e in left] == ["live"] and left[0].type == "Warning"
    assert "no operator is left to delete them" in left[0].message

    again = runner.invoke(app, ["doctor", *kube])
    assert again.exit_code == 0 and "No DistillationJob holds" in again.output
