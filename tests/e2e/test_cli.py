"""The `kubedistill` CLI against the real test control plane with the operator running (fake stage pods):
apply → get → wait → describe → artifacts → logs → alias; `wait` exit codes; an invalid spec names the same
field locally and in the cluster; no secret value is ever printed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from sdk_cli_support import job_body, operator_process, wait_until
from typer.testing import CliRunner, Result

from kubedistill.cli import app
from kubedistill_testing.kubelet import LocalKubelet

pytestmark = pytest.mark.cluster

SECRET_VALUE = "sk-e2e-do-not-print-0123456789"
runner = CliRunner()


@pytest.fixture
def cluster_args(
    control_plane: Path, namespace: str, kubelet: LocalKubelet, tmp_path: Path, k8s_api: client.ApiClient
) -> Iterator[list[str]]:
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "openai"},
            "data": {"api-key": base64.b64encode(SECRET_VALUE.encode()).decode()},
        },
    )
    # The fake train stage sleeps 3 s: long enough for a 2 s deadline to fail a job.
    with operator_process(control_plane, namespace, tmp_path, kubelet, KUBEDISTILL_FAKE_SLEEP="train:3"):
        yield ["-n", namespace, "--kubeconfig", str(control_plane)]


def job_doc(name: str, **spec: Any) -> dict[str, Any]:
    teacher = {"model": "openai/gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "api-key"}}
    return job_body(name, **{"teacher": teacher, **spec})


def write(tmp_path: Path, *docs: dict[str, Any]) -> Path:
    path = tmp_path / f"{docs[0]['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    return path


def kd(*args: str) -> Result:
    result = runner.invoke(app, list(args))
    assert SECRET_VALUE not in result.output
    return result


def test_apply_get_wait_describe_artifacts_logs_alias(cluster_args: list[str], tmp_path: Path) -> None:
    alias = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "ModelAlias",
        "metadata": {"name": "smart"},
        "spec": {"target": {"distillationJob": "triage"}},
    }
    applied = kd("apply", "-f", str(write(tmp_path, job_doc("triage"), alias)), *cluster_args)
    assert applied.exit_code == 0, applied.output
    assert applied.output.splitlines() == [
        "distillationjob.kubedistill.io/triage created",
        "modelalias.kubedistill.io/smart created",
    ]
    listed = kd("get", *cluster_args)
    assert listed.exit_code == 0 and listed.output.split()[:9] == [
        "NAME", "PHASE", "PROGRESS", "QUEUED", "TEACHER", "STUDENT", "COST", "EVAL", "AGE",
    ]  # fmt: skip
    assert "triage" in listed.output  # the teacher's column may be cut to the runner's 80 columns

    waited = kd("wait", "triage", "--timeout", "120", *cluster_args)
    assert waited.exit_code == 0, waited.output
    assert "distillationjob/triage Succeeded" in waited.output
    for stage in ("generate", "curate", "train", "export", "evaluate"):
        assert stage in waited.output

    described = kd("describe", "triage", *cluster_args)
    assert described.exit_code == 0, described.output
    for section in (
        "Phase:",
        "Succeeded",
        "Conditions",
        "Stages",
        "Metrics:",
        "Artifacts:",
        "Events",
        "StageStarted",
    ):
        assert section in described.output, section

    arts = json.loads(kd("artifacts", "triage", "-o", "json", *cluster_args).output)
    assert (
        arts["gguf_paths"]["q4_k_m"].endswith(".gguf") and arts["metrics"]["student_loss_final"] is not None
    )

    # The API server proxies pod logs from the local kubelet, as from a node.
    logs = kd("logs", "triage", "--stage", "train", "--tail", "1", *cluster_args)
    assert (logs.exit_code, logs.output) == (0, "train attempt 1: ok\n")
    assert kd("logs", "triage", "--stage", "nope", *cluster_args).exit_code == 2

    got = json.loads(kd("alias", "get", "smart", "-o", "json", *cluster_args).output)
    assert got["target"] == {"distillationJob": "triage", "quantization": "q4_k_m"}
    pinned = kd(
        "alias",
        "set",
        "smart",
        "--gguf",
        "file:///models/old.gguf",
        "--base-model",
        "qwen3-0.6b",
        *cluster_args,
    )
    assert pinned.exit_code == 0, pinned.output
    listed_json = json.loads(kd("get", "-o", "json", *cluster_args).output)
    assert [o["metadata"]["name"] for o in listed_json["items"]] == ["triage"]
    assert listed_json["items"][0]["spec"]["teacher"]["model"] == "openai/gpt-4o-mini"
    assert (
        kd("delete", "triage", *cluster_args).output.strip()
        == "distillationjob.kubedistill.io/triage deleted"
    )


def test_wait_exit_codes_for_failed_and_missing_jobs(cluster_args: list[str], tmp_path: Path) -> None:
    missing = kd("wait", "no-such-job", *cluster_args)
    assert missing.exit_code == 2
    assert (
        'Error from server (NotFound): distillationjobs.kubedistill.io "no-such-job" not found'
        in missing.output
    )

    doomed = job_doc("doomed", activeDeadlineSeconds=2, retries=0)
    assert kd("apply", "-f", str(write(tmp_path, doomed)), *cluster_args).exit_code == 0
    failed = kd("wait", "doomed", "--timeout", "120", *cluster_args)
    assert failed.exit_code == 1, failed.output
    assert "distillationjob/doomed Failed" in failed.output

    suspended = kd("suspend", "doomed", *cluster_args)
    assert suspended.exit_code == 0 and "suspended" in suspended.output


def test_an_invalid_spec_names_the_same_field_locally_and_in_the_cluster(
    cluster_args: list[str], tmp_path: Path
) -> None:
    bad = job_doc("bad", curation={"judge": {"majority": {}}, "topK": 3})
    bad["spec"]["teacher"].pop("apiKeySecretRef")
    path = write(tmp_path, bad)
    local = kd("run", str(path), "--local", "--workdir", str(tmp_path / "work"))
    cluster = kd("apply", "-f", str(path), *cluster_args)
    assert local.exit_code == 2 and cluster.exit_code == 1, (local.output, cluster.output)
    assert "spec.curation.topK: " in local.output and "spec.curation.topK: " in cluster.output
    assert "must not exceed" in local.output and "must not exceed" in cluster.output

    typo = job_doc("typo")
    typo["spec"]["training"] = {"stpes": 3}
    path = write(tmp_path, typo)
    local = kd("run", str(path), "--local", "--workdir", str(tmp_path / "work"))
    cluster = kd("apply", "-f", str(path), *cluster_args)
    assert "spec.training.stpes" in local.output and "spec.training.stpes" in cluster.output
    assert kd("get", *cluster_args).output.count("bad") == 0


def test_logs_of_a_running_and_a_finished_train_stage(
    control_plane: Path, namespace: str, kubelet: LocalKubelet, tmp_path: Path, k8s_api: client.ApiClient
) -> None:
    """`kubedistill logs --stage train` reads the train pod's output through the API server and kubelet."""
    args = ["-n", namespace, "--kubeconfig", str(control_plane)]
    core = client.CoreV1Api(k8s_api)
    release = tmp_path / "release-train"
    # The train stage works until the test lets it finish, so its pod is certainly running when read.
    with operator_process(
        control_plane, namespace, tmp_path, kubelet, KUBEDISTILL_FAKE_HOLD=f"train:{release}"
    ):
        body = job_doc("logged", teacher={"model": "openai/gpt-4o-mini"})
        assert kd("apply", "-f", str(write(tmp_path, body)), *args).exit_code == 0

        def train_pod() -> str | None:
            pods = core.list_namespaced_pod(namespace, label_selector="job-name").items
            running = [p for p in pods if "-train-" in p.metadata.name and p.status.phase == "Running"]
            return running[0].metadata.name if running else None

        wait_until(train_pod, "the train pod to run", 120)
        # Until the stage has printed its first line the answer is empty, then it is that line.
        running = wait_until(
            lambda: (r := kd("logs", "logged", "--stage", "train", *args)).output and r,
            "the train stage to log",
        )
        assert (running.exit_code, running.output) == (0, "train attempt 1: started\n"), running.output
        assert train_pod(), "the pod still runs: it waits for the release file"

        release.touch()
        assert kd("wait", "logged", "--timeout", "120", *args).exit_code == 0
        finished = kd("logs", "logged", "--stage", "train", *args)
        assert finished.exit_code == 0, finished.output
        assert finished.output == "train attempt 1: started\ntrain attempt 1: ok\n"
        assert (
            kd("logs", "logged", "--stage", "train", "--tail", "1", *args).output == "train attempt 1: ok\n"
        )
