"""The operator end to end on the real control plane: kube-apiserver, the Job controller, the garbage
collector and the local kubelet run everything; stage pods run the contract-honouring fake stage.

Each test starts its own operator process (`python -m kubedistill.handlers -n <ns>`) so it can script the
fake stage through KUBEDISTILL_STAGE_ENV, and kill and restart it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from sdk_cli_support import job_body

from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from kubedistill.domain.deletion import FINALIZER
from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.operator_process import OperatorProcess
from kubedistill_testing.s3 import RcloneS3

pytestmark = pytest.mark.cluster

GROUP, VERSION = "kubedistill.io", "v1alpha1"
FAKE_IMAGE = "kubedistill.test/fake-stage"
LABEL_JOB = "kubedistill.io/job"
WAIT_S = 60.0


@pytest.fixture
def fake_stage_image(kubelet: LocalKubelet) -> Iterator[str]:
    """Map a test image to the fake stage program in the shared local kubelet."""
    kubelet.images[FAKE_IMAGE] = [sys.executable, "-m", "kubedistill_testing.fake_stage"]
    yield f"{FAKE_IMAGE}:1"


class Operator(OperatorProcess):
    """The operator with the fake stage as its trainer image; a start may script the fake stage."""

    def __init__(self, kubeconfig: Path, namespace: str, workdir: Path, image: str) -> None:
        super().__init__(
            kubeconfig,
            namespace,
            workdir,
            {
                "KUBEDISTILL_TRAINER_IMAGE": image,
                "KUBEDISTILL_ARTIFACT_ROOT": (workdir / "artifacts").as_uri(),
            },
        )

    @property
    def artifacts(self) -> Path:
        return self.workdir / "artifacts"

    def start(self, **stage_env: str) -> Operator:
        if stage_env:
            self.env["KUBEDISTILL_STAGE_ENV"] = json.dumps(stage_env)
        super().start()
        return self


@pytest.fixture
def operator(
    control_plane: Path, namespace: str, fake_stage_image: str, tmp_path: Path
) -> Iterator[Operator]:
    running = Operator(control_plane, namespace, tmp_path, fake_stage_image)
    yield running
    running.stop()


@pytest.fixture
def custom(k8s_api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(k8s_api)


@pytest.fixture
def batch(k8s_api: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(k8s_api)


def create_job(custom: client.CustomObjectsApi, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "distillationjobs", job_body(name, **spec)
    )
    return created


def get_job(custom: client.CustomObjectsApi, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "distillationjobs", name
    )
    return found


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def stage_status(obj: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s for s in obj["status"]["stages"] if s["name"] == stage)


def running_stage(obj: dict[str, Any]) -> str | None:
    stages = (obj.get("status") or {}).get("stages") or []
    return next((s["name"] for s in stages if s["state"] == "Running"), None)


def child_jobs(batch: client.BatchV1Api, namespace: str, name: str) -> list[str]:
    jobs = batch.list_namespaced_job(namespace, label_selector=f"{LABEL_JOB}={name}").items
    return sorted(j.metadata.name for j in jobs)


def wait_phase(
    custom: client.CustomObjectsApi, operator: Operator, name: str, phases: set[str], timeout: float = WAIT_S
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        assert operator.alive(), f"operator exited:\n{operator.logs()[-4000:]}"
        obj = get_job(custom, operator.namespace, name)
        return obj if (obj.get("status") or {}).get("phase") in phases else None

    try:
        found: dict[str, Any] = wait_until(reached, f"{name} to reach {phases}", timeout)
    except AssertionError:
        obj = get_job(custom, operator.namespace, name)
        raise AssertionError(
            f"{name} never reached {phases}: {json.dumps(obj.get('status'), indent=1)}\n{operator.logs()[-3000:]}"
        ) from None
    return found


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def gone(custom: client.CustomObjectsApi, namespace: str, name: str) -> bool:
    try:
        get_job(custom, namespace, name)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def finalizers(custom: client.CustomObjectsApi, namespace: str, name: str) -> list[str]:
    found: list[str] = get_job(custom, namespace, name)["metadata"].get("finalizers") or []
    return found


def conditions_until_deleted(
    custom: client.CustomObjectsApi, namespace: str, name: str, version: str, type_: str
) -> list[dict[str, Any]]:
    """Every `type_` condition the job showed, version by version from `version` until it was deleted."""
    seen = []
    stream = watch.Watch()
    for event in stream.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        "distillationjobs",
        field_selector=f"metadata.name={name}",
        resource_version=version,
        timeout_seconds=int(WAIT_S),
    ):
        found = condition(event["object"], type_)
        if found is not None:
            seen.append(found)
        if event["type"] == "DELETED":
            stream.stop()
    return seen


def events_for(k8s_api: client.ApiClient, namespace: str, name: str) -> list[str]:
    events = client.CoreV1Api(k8s_api).list_namespaced_event(namespace).items
    return [e.reason for e in events if e.involved_object.name == name]


# ---------------------------------------------------------------------------------------------- tests


def test_happy_path_succeeds_and_repoints_the_alias(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api, k8s_api: client.ApiClient
) -> None:
    ns = operator.namespace
    old_target = {"ggufURI": "file:///models/previous.gguf", "baseModel": "qwen3-0.6b"}
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        ns,
        "modelaliases",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelAlias",
            "metadata": {"name": "smart"},
            "spec": {"target": old_target},
        },
    )
    operator.start(KUBEDISTILL_FAKE_SCORE="0.91")
    create_job(custom, ns, "happy", promotion={"alias": "smart", "minEvalScore": 0.5})
    done = wait_phase(custom, operator, "happy", {"Succeeded", "Failed"})
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert child_jobs(batch, ns, "happy") == sorted(
        f"happy-{s}-1" for s in ("estimate", "generate", "curate", "train", "export", "evaluate")
    )
    assert [s["state"] for s in status["stages"]] == ["Succeeded"] * 6
    assert status["metrics"]["evalScore"] == 0.91 and status["metrics"]["teacherCalls"] == 6
    gguf = status["artifacts"]["ggufURIs"]["q4_k_m"]
    assert gguf.startswith(operator.artifacts.as_uri()) and gguf.endswith("student-q4_k_m.gguf")
    assert status["estimate"]["prompts"] == 3
    assert status["progress"]["percent"] == 100.0
    assert condition(done, "Complete")["status"] == "True"  # type: ignore[index]
    assert condition(done, "Promoted")["status"] == "True"  # type: ignore[index]
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert (operator.artifacts / ns / "happy" / done["metadata"]["uid"] / "train" / "result.json").is_file()

    def alias_resolved() -> dict[str, Any] | None:
        alias = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "modelaliases", "smart")
        ready = condition(alias, "Ready")
        return alias if ready and ready["status"] == "True" and alias["status"].get("history") else None

    try:
        alias = wait_until(alias_resolved, "alias smart to resolve to the new student")
    except AssertionError:
        alias = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "modelaliases", "smart")
        raise AssertionError(
            f"alias not resolved: {json.dumps(alias, indent=1)}\n{operator.logs()[-3000:]}"
        ) from None
    assert alias["spec"]["target"] == {"distillationJob": "happy", "quantization": "q4_k_m"}
    assert alias["status"]["ggufURI"] == gguf and alias["status"]["model"] == "qwen3-0.6b"
    assert alias["status"]["history"][0]["target"]["ggufURI"] == old_target["ggufURI"]
    reasons = events_for(k8s_api, ns, "happy")
    assert reasons.count("StageStarted") == 6 and "PhaseSucceeded" in reasons


def test_a_stage_failing_once_is_retried(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    operator.start(KUBEDISTILL_FAKE_FAIL="curate:1")
    create_job(custom, operator.namespace, "flaky")
    done = wait_phase(custom, operator, "flaky", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", done["status"]
    curate = stage_status(done, "curate")
    assert curate["attempts"] == 2 and curate["jobName"] == "flaky-curate-2"
    assert {"flaky-curate-1", "flaky-curate-2"} <= set(child_jobs(batch, operator.namespace, "flaky"))


def test_retries_exhausted_fail_with_the_pods_message(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    operator.start(KUBEDISTILL_FAKE_FAIL="train:9", KUBEDISTILL_FAKE_FAIL_MESSAGE="CUDA out of memory (fake)")
    create_job(custom, operator.namespace, "doomed", retries=1)
    done = wait_phase(custom, operator, "doomed", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Failed"
    failed = condition(done, "Failed")
    assert failed is not None and failed["status"] == "True" and failed["reason"] == "StageFailed"
    assert "CUDA out of memory (fake)" in failed["message"] and "train" in failed["message"]
    assert stage_status(done, "train")["attempts"] == 2
    assert not [j for j in child_jobs(batch, operator.namespace, "doomed") if "export" in j]


def test_operator_killed_mid_stage_restarts_without_duplicates(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    # The train stage works until the test lets it finish: a slow restart cannot miss it running.
    release = operator.workdir / "release-train"
    operator.start(KUBEDISTILL_FAKE_HOLD=f"train:{release}")
    create_job(custom, operator.namespace, "restart")
    wait_until(
        lambda: running_stage(get_job(custom, operator.namespace, "restart")) == "train", "train to run"
    )
    operator.kill()
    operator.start()

    def train_progress() -> dict[str, Any] | None:
        progress = (get_job(custom, operator.namespace, "restart").get("status") or {}).get("progress") or {}
        return (
            progress
            if progress.get("stage") == "train" and "fake train step" in (progress.get("detail") or "")
            else None
        )

    # The restarted operator picks the running stage's progress.json up (generate + curate = 50%).
    progress = wait_until(train_progress, "train progress in the status")
    assert 50.0 <= progress["percent"] <= 85.0
    release.touch()
    done = wait_phase(custom, operator, "restart", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    assert child_jobs(batch, operator.namespace, "restart") == sorted(
        f"restart-{s}-1" for s in ("estimate", "generate", "curate", "train", "export", "evaluate")
    )


def test_suspend_stops_the_stage_and_resume_finishes(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    ns = operator.namespace
    operator.start(KUBEDISTILL_FAKE_SLEEP="curate:4")
    create_job(custom, ns, "pausable")
    wait_phase(custom, operator, "pausable", {"Curating"})
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, "distillationjobs", "pausable", {"spec": {"suspend": True}}
    )
    suspended = wait_phase(custom, operator, "pausable", {"Suspended"})
    assert condition(suspended, "Suspended")["status"] == "True"  # type: ignore[index]
    wait_until(
        lambda: batch.read_namespaced_job("pausable-curate-1", ns).spec.suspend,
        "the curate Job to be suspended",
    )
    wait_until(
        lambda: not (batch.read_namespaced_job("pausable-curate-1", ns).status.active or 0),
        "the curate pod to stop",
    )
    assert "pausable-train-1" not in child_jobs(batch, ns, "pausable")
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, "distillationjobs", "pausable", {"spec": {"suspend": False}}
    )
    done = wait_phase(custom, operator, "pausable", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    assert condition(done, "Suspended")["status"] == "False"  # type: ignore[index]
    assert stage_status(done, "curate")["attempts"] == 1


def test_deletion_mid_run_removes_the_children(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api, k8s_api: client.ApiClient
) -> None:
    ns = operator.namespace
    operator.start(KUBEDISTILL_FAKE_SLEEP="generate:30")
    create_job(custom, ns, "doomed-early", storage={"deleteOnJobDeletion": True})
    uid = get_job(custom, ns, "doomed-early")["metadata"]["uid"]
    progress = operator.artifacts / ns / "doomed-early" / uid / "generate" / "progress.json"
    wait_until(progress.is_file, "generate to report progress")
    version = get_job(custom, ns, "doomed-early")["metadata"]["resourceVersion"]
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs", "doomed-early")
    # The finalizer's wait for the stage pods shows in the deleted job's status.
    deleting = conditions_until_deleted(custom, ns, "doomed-early", version, "Deleting")
    wait_until(lambda: gone(custom, ns, "doomed-early"), "the DistillationJob to be deleted")
    assert deleting and deleting[0]["status"] == "True" and deleting[0]["reason"] == "StagePodsTerminating"
    # The estimate's finished pod and the running generate pod go with their Jobs.
    assert "stage pod(s) still terminating (" in deleting[0]["message"]
    assert "doomed-early-generate-1-" in deleting[0]["message"]
    assert child_jobs(batch, ns, "doomed-early") == []
    core = client.CoreV1Api(k8s_api)
    selector = f"{LABEL_JOB}=doomed-early"
    wait_until(lambda: not core.list_namespaced_pod(ns, label_selector=selector).items, "pods to go")
    # storage.deleteOnJobDeletion: no object is left under the job's prefix (empty directories are no objects).
    assert not [p for p in (operator.artifacts / ns / "doomed-early" / uid).rglob("*") if p.is_file()]


def test_budget_exceeded_starts_nothing_until_raised(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    ns = operator.namespace
    operator.start()
    create_job(
        custom, ns, "pricey", teacher={"model": "openai/gpt-4o"}, budget={"maxTeacherCostUSD": 0.000001}
    )
    blocked = wait_until(
        lambda: (lambda o: o if (condition(o, "BudgetExceeded") or {}).get("status") == "True" else None)(
            get_job(custom, ns, "pricey")
        ),
        "BudgetExceeded",
    )
    assert blocked["status"]["phase"] == "Pending"
    assert blocked["status"]["estimate"]["teacherCostUSD"] > 0.000001
    assert "exceeds budget.maxTeacherCostUSD" in condition(blocked, "BudgetExceeded")["message"]  # type: ignore[index]
    # The estimate ran as a stage of its own; nothing after it starts.
    assert child_jobs(batch, ns, "pricey") == ["pricey-estimate-1"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, "distillationjobs", "pricey", {"spec": {"budget": {"maxTeacherCostUSD": 1000}}}
    )
    done = wait_phase(custom, operator, "pricey", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    assert condition(done, "BudgetExceeded")["status"] == "False"  # type: ignore[index]


def test_missing_secret_is_named_and_the_operator_keeps_running(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api, k8s_api: client.ApiClient
) -> None:
    ns = operator.namespace
    operator.start()
    create_job(
        custom,
        ns,
        "keyless",
        teacher={"model": "openai/gpt-4o-mini", "apiKeySecretRef": {"name": "openai", "key": "api-key"}},
    )
    blocked = wait_until(
        lambda: (lambda o: o if (condition(o, "SecretMissing") or {}).get("status") == "True" else None)(
            get_job(custom, ns, "keyless")
        ),
        "SecretMissing",
    )
    message = condition(blocked, "SecretMissing")["message"]  # type: ignore[index]
    assert "Secret openai" in message and "api-key" in message
    assert child_jobs(batch, ns, "keyless") == []
    assert operator.alive()
    client.CoreV1Api(k8s_api).create_namespaced_secret(
        ns, {"metadata": {"name": "openai"}, "stringData": {"api-key": "sk-test-not-real"}}
    )
    done = wait_phase(custom, operator, "keyless", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    assert "sk-test-not-real" not in json.dumps(done) and "sk-test-not-real" not in operator.logs()


def test_gpu_stage_without_gpus_is_pending_with_the_reason(
    operator: Operator, custom: client.CustomObjectsApi
) -> None:
    ns = operator.namespace
    operator.env["KUBEDISTILL_DEFAULT_TRAIN_GPUS"] = "1"
    operator.start()
    create_job(custom, ns, "gpu")

    def unschedulable() -> dict[str, Any] | None:
        obj = get_job(custom, ns, "gpu")
        ready = condition(obj, "Ready")
        return obj if ready and ready["reason"] == "Unschedulable" else None

    blocked = wait_until(unschedulable, "the train stage to report Unschedulable")
    assert blocked["status"]["phase"] == "Training"
    train = stage_status(blocked, "train")
    assert train["state"] == "Pending" and "nvidia.com/gpu" in train["message"]
    assert "nvidia.com/gpu" in condition(blocked, "Ready")["message"]  # type: ignore[index]


def test_low_score_skips_promotion_with_both_numbers(
    operator: Operator, custom: client.CustomObjectsApi
) -> None:
    ns = operator.namespace
    operator.start(KUBEDISTILL_FAKE_SCORE="0.2")
    create_job(custom, ns, "weak", promotion={"alias": "smart", "minEvalScore": 0.8})
    done = wait_phase(custom, operator, "weak", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    skipped = condition(done, "PromotionSkipped")
    assert skipped is not None and skipped["status"] == "True"
    assert "0.2" in skipped["message"] and "0.8" in skipped["message"]
    with pytest.raises(ApiException) as err:
        custom.get_namespaced_custom_object(GROUP, VERSION, ns, "modelaliases", "smart")
    assert err.value.status == 404


def test_active_deadline_fails_the_whole_job(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    ns = operator.namespace
    operator.start(KUBEDISTILL_FAKE_SLEEP="generate:60")
    # Long enough for the estimate (a real stage process) to finish first on a busy machine.
    create_job(custom, ns, "slow", activeDeadlineSeconds=20)
    done = wait_phase(custom, operator, "slow", {"Succeeded", "Failed"})
    failed = condition(done, "Failed")
    assert failed is not None and failed["reason"] == "DeadlineExceeded"
    assert child_jobs(batch, ns, "slow") == ["slow-estimate-1", "slow-generate-1"]
    job = batch.read_namespaced_job("slow-generate-1", ns)
    assert job.spec.active_deadline_seconds is not None and job.spec.active_deadline_seconds < 20
    wait_until(
        lambda: not (batch.read_namespaced_job("slow-generate-1", ns).status.active or 0), "the stage to stop"
    )


def test_ttl_after_finished_deletes_the_children(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    ns = operator.namespace
    operator.start()
    create_job(custom, ns, "brief", ttlSecondsAfterFinished=1)
    done = wait_phase(custom, operator, "brief", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded"
    wait_until(lambda: child_jobs(batch, ns, "brief") == [], "the stage Jobs to be deleted")
    # The status keeps what the children reported.
    kept = get_job(custom, ns, "brief")
    assert kept["status"]["phase"] == "Succeeded" and kept["status"]["metrics"]["evalScore"] == 0.9


def set_deletes_artifacts(custom: client.CustomObjectsApi, namespace: str, name: str, value: bool) -> None:
    patch = {"spec": {"storage": {"deleteOnJobDeletion": value}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "distillationjobs", name, patch)


def test_only_a_job_that_deletes_its_artifacts_carries_the_finalizer(
    operator: Operator, custom: client.CustomObjectsApi, batch: client.BatchV1Api
) -> None:
    ns = operator.namespace
    operator.start(KUBEDISTILL_FAKE_SLEEP="generate:30")
    create_job(custom, ns, "plain")
    create_job(custom, ns, "cleaning", storage={"deleteOnJobDeletion": True})
    wait_until(lambda: FINALIZER in finalizers(custom, ns, "cleaning"), "the finalizer on the cleaning job")
    wait_phase(custom, operator, "plain", {"Generating"})
    assert finalizers(custom, ns, "plain") == []
    # The spec decides, both ways.
    set_deletes_artifacts(custom, ns, "plain", True)
    wait_until(lambda: FINALIZER in finalizers(custom, ns, "plain"), "the finalizer to be added")
    for name in ("plain", "cleaning"):
        set_deletes_artifacts(custom, ns, name, False)
        wait_until(lambda name=name: finalizers(custom, ns, name) == [], "the finalizer to be removed")
    assert running_stage(get_job(custom, ns, "cleaning")) == "generate"  # the job itself goes on
    # No operator: a job without the finalizer is deleted at once (the reported bug: kubectl delete
    # hung), and the garbage collector deletes its running stage Job.
    operator.stop()
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs", "cleaning")
    wait_until(lambda: gone(custom, ns, "cleaning"), "the job to be deleted", timeout=5)
    wait_until(
        lambda: child_jobs(batch, ns, "cleaning") == [], "the garbage collector to delete the stage Job"
    )


def test_the_finalizers_an_older_operator_left_are_removed_at_startup(
    operator: Operator, custom: client.CustomObjectsApi
) -> None:
    """Today's operator put its finalizer on every job; after the upgrade only those that need it keep it."""
    ns = operator.namespace
    for name, spec in (("old-plain", {}), ("old-cleaning", {"storage": {"deleteOnJobDeletion": True}})):
        body = job_body(name, **spec)
        body["metadata"]["finalizers"] = [FINALIZER]
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs", body)
    operator.start()
    wait_until(lambda: finalizers(custom, ns, "old-plain") == [], "the unneeded finalizer to be removed")
    done = wait_phase(custom, operator, "old-cleaning", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded" and done["metadata"]["finalizers"] == [FINALIZER]
    assert (
        wait_phase(custom, operator, "old-plain", {"Succeeded", "Failed"})["status"]["phase"] == "Succeeded"
    )
    # The kept finalizer still does its work (and leaves the namespace deletable).
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs", "old-cleaning")
    wait_until(lambda: gone(custom, ns, "old-cleaning"), "the job with the finalizer to be deleted")


def test_the_estimate_reads_the_dataset_with_the_jobs_own_storage_secret(
    operator: Operator, custom: client.CustomObjectsApi, k8s_api: client.ApiClient, tmp_path: Path
) -> None:
    """The operator's own S3 credentials are wrong; the job names a Secret with the right ones. The
    estimate runs as a stage pod with that Secret, so the job succeeds: the operator reads no data."""
    ns = operator.namespace
    with RcloneS3(tmp_path / "s3") as s3:
        s3.create_bucket("team-data")
        s3.create_bucket("team-artifacts")
        rows = "".join(
            json.dumps({"id": i, "prompt": f"ticket {i}: my invoice is wrong"}) + "\n" for i in range(40)
        )
        (tmp_path / "s3" / "team-data" / "tickets.jsonl").write_text(rows, encoding="utf-8")
        client.CoreV1Api(k8s_api).create_namespaced_secret(
            ns,
            {
                "metadata": {"name": "team-s3"},
                "stringData": {S3_ACCESS_KEY_ENV: s3.access_key, S3_SECRET_KEY_ENV: s3.secret_key},
            },
        )
        operator.env.update(
            {
                "KUBEDISTILL_STORAGE_ENDPOINT": s3.endpoint,
                S3_ACCESS_KEY_ENV: "wrong",
                S3_SECRET_KEY_ENV: "wrong-wrong",
            }
        )
        operator.start()
        create_job(
            custom,
            ns,
            "own-creds",
            dataset={"uri": "s3://team-data/tickets.jsonl"},
            storage={"bucket": "team-artifacts", "endpoint": s3.endpoint, "credentialsSecretRef": "team-s3"},
        )
        done = wait_phase(custom, operator, "own-creds", {"Succeeded", "Failed"})
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert done["status"]["estimate"]["prompts"] == 40
        assert stage_status(done, "estimate")["state"] == "Succeeded"
        uid = done["metadata"]["uid"]
        written = tmp_path / "s3" / "team-artifacts" / "kubedistill" / ns / "own-creds" / uid
        assert (written / "estimate" / "result.json").is_file()
        for secret in (s3.access_key, s3.secret_key):
            assert secret not in json.dumps(done) and secret not in operator.logs()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_a_dataset_larger_than_the_operators_memory_never_enters_it(
    operator: Operator, custom: client.CustomObjectsApi, tmp_path: Path
) -> None:
    """A 48 MB dataset is estimated while the operator's memory may grow by at most 16 MB (loading the
    file whole takes more than its size), and another job runs to the end meanwhile; the operator is
    never restarted. The latency of the other job's reconciliation is measured by
    bench/dataset_scale.py, not here."""
    ns = operator.namespace
    big = tmp_path / "big.jsonl"
    filler = "please look into this, the export keeps failing since the update. " * 3
    with big.open("w", encoding="utf-8") as f:
        for i in range(220_000):
            f.write(json.dumps({"id": i, "prompt": f"{i}: {filler}"}) + "\n")
    size_mb = big.stat().st_size / 1e6
    limit_mb = 16.0
    assert size_mb > 3 * limit_mb
    operator.start()
    create_job(custom, ns, "warm-up")
    assert wait_phase(custom, operator, "warm-up", {"Succeeded", "Failed"})["status"]["phase"] == "Succeeded"
    assert operator.process is not None
    before = peak_rss_mb(operator.process.pid)

    create_job(custom, ns, "big", dataset={"uri": big.as_uri()})
    wait_phase(custom, operator, "big", {"Estimating", "Generating", "Curating", "Training"})
    create_job(custom, ns, "meanwhile")
    assert (
        wait_phase(custom, operator, "meanwhile", {"Succeeded", "Failed"})["status"]["phase"] == "Succeeded"
    )
    done = wait_phase(custom, operator, "big", {"Succeeded", "Failed"}, timeout=180)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["estimate"]["prompts"] == 220_000

    grown = peak_rss_mb(operator.process.pid) - before
    assert grown < limit_mb, f"the operator's peak memory grew by {grown:.1f} MB ({size_mb:.0f} MB dataset)"
    assert operator.alive() and operator.starts == 1
    assert "reconcile crashed" not in operator.logs()
