"""Real Kueue admits the stage Jobs: a ClusterQueue with one `nvidia.com/gpu`, two DistillationJobs whose
train stage needs one GPU each. The second one's train Job waits `Queued` (Kueue's reason) while the
first trains — suspended and resumed meanwhile through its Workload — then runs; both succeed; and the
operator never changed a stage Job's `suspend`.

Kueue's manager is built from the Go module proxy (kubedistill_testing.kueue) and runs without its
admission webhooks registered, so the operator's own create-suspended path is what is exercised.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from test_operator import (
    Operator,
    condition,
    create_job,
    get_job,
    stage_status,
    wait_phase,
    wait_until,
)

from kubedistill.domain.queueing import DEACTIVATED_ANNOTATION, QUEUE_LABEL
from kubedistill_testing import cluster
from kubedistill_testing import kueue as kueue_harness
from kubedistill_testing.kubelet import LocalKubelet

pytestmark = pytest.mark.cluster

KUEUE = ("kueue.x-k8s.io", "v1beta2")
KUEUE_API = "/".join(KUEUE)
GPU = "nvidia.com/gpu"
WAIT_S = 120.0


@pytest.fixture(scope="module")
def kueue(
    control_plane: Path, k8s_api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[kueue_harness.Kueue]:
    try:
        with kueue_harness.running(control_plane, tmp_path_factory.mktemp("kueue"), k8s_api) as running:
            yield running
    except cluster.ClusterError as err:
        pytest.fail(f"Kueue: {err}", pytrace=False)


@pytest.fixture
def one_gpu(kubelet: LocalKubelet) -> Iterator[None]:
    kubelet.advertise({GPU: "1"})
    yield
    kubelet.advertise({GPU: "0"})


@pytest.fixture
def queue(k8s_api: client.ApiClient, namespace: str, kueue: kueue_harness.Kueue) -> Iterator[str]:
    """ResourceFlavor + ClusterQueue (1 GPU, this namespace only) + LocalQueue `gpu`."""
    custom = client.CustomObjectsApi(k8s_api)
    name = f"kd-{namespace}"
    custom.create_cluster_custom_object(
        *KUEUE,
        "resourceflavors",
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": name}},
    )
    quota = [
        {"name": "cpu", "nominalQuota": "64"},
        {"name": "memory", "nominalQuota": "512Gi"},
        {"name": GPU, "nominalQuota": "1"},
    ]
    custom.create_cluster_custom_object(
        *KUEUE,
        "clusterqueues",
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", GPU],
                        "flavors": [{"name": name, "resources": quota}],
                    }
                ],
            },
        },
    )
    custom.create_namespaced_custom_object(
        *KUEUE, namespace, "localqueues", {"apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": "gpu"}, "spec": {"clusterQueue": name}}
    )  # fmt: skip
    yield "gpu"
    custom.delete_cluster_custom_object(*KUEUE, "clusterqueues", name)
    custom.delete_cluster_custom_object(*KUEUE, "resourceflavors", name)


@pytest.fixture
def operator(
    control_plane: Path, namespace: str, kubelet: LocalKubelet, tmp_path: Path
) -> Iterator[Operator]:
    image = "kubedistill.test/fake-stage"
    kubelet.images[image] = [sys.executable, "-m", "kubedistill_testing.fake_stage"]
    running = Operator(control_plane, namespace, tmp_path, f"{image}:1")
    yield running
    running.stop()


class JobHistory:
    """Every version of every Job in the namespace, from a watch started before the first one exists."""

    def __init__(self, batch: client.BatchV1Api, namespace: str) -> None:
        self.versions: list[dict[str, Any]] = []
        self._stopped = threading.Event()
        self._watch = watch.Watch()
        version = batch.list_namespaced_job(namespace).metadata.resource_version
        self._thread = threading.Thread(target=self._run, args=(batch, namespace, version), daemon=True)
        self._thread.start()

    def _run(self, batch: client.BatchV1Api, namespace: str, version: str) -> None:
        while not self._stopped.is_set():
            try:
                for event in self._watch.stream(
                    batch.list_namespaced_job, namespace, resource_version=version, timeout_seconds=30
                ):
                    obj = batch.api_client.sanitize_for_serialization(event["object"])
                    version = obj["metadata"]["resourceVersion"]
                    self.versions.append(obj)
            except Exception:  # a dropped stream resumes from the last version seen
                if self._stopped.wait(1.0):
                    return

    def stop(self) -> None:
        self._stopped.set()
        self._watch.stop()

    def of(self, name: str) -> list[dict[str, Any]]:
        return [v for v in self.versions if v["metadata"]["name"] == name]


def _owns_suspend(entry: dict[str, Any]) -> bool:
    return "f:suspend" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})


def suspend_flips(versions: list[dict[str, Any]]) -> list[tuple[bool, set[str]]]:
    """(new suspend, managers owning spec.suspend) for each version that changed it."""
    flips = []
    for before, after in itertools.pairwise(versions):
        if before["spec"].get("suspend") != after["spec"].get("suspend"):
            owners = {e["manager"] for e in after["metadata"].get("managedFields") or [] if _owns_suspend(e)}
            flips.append((bool(after["spec"].get("suspend")), owners))
    return flips


def creator(versions: list[dict[str, Any]]) -> str:
    """The field manager that created the Job: the one owning its ownerReferences (the operator)."""
    first = versions[0]["metadata"]["managedFields"]
    return next(
        e["manager"] for e in first if "f:ownerReferences" in (e.get("fieldsV1") or {}).get("f:metadata", {})
    )


def test_the_second_train_stage_waits_in_kueue_until_the_first_frees_the_gpu(
    operator: Operator,
    queue: str,
    one_gpu: None,
    k8s_api: client.ApiClient,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    ns = operator.namespace
    custom, batch = client.CustomObjectsApi(k8s_api), client.BatchV1Api(k8s_api)
    history = JobHistory(batch, ns)
    request.addfinalizer(history.stop)
    release = tmp_path / "release-train"
    # The second job names no queue: the operator's default sends it to the same LocalQueue.
    operator.env.update({"KUBEDISTILL_DEFAULT_TRAIN_GPUS": "1", "KUBEDISTILL_QUEUE_NAME": queue})
    operator.start(KUBEDISTILL_FAKE_HOLD=f"train:{release}")
    create_job(custom, ns, "first", queueName=queue)

    def training(name: str) -> dict[str, Any] | None:
        obj = get_job(custom, ns, name)
        stages = (obj.get("status") or {}).get("stages") or []
        return obj if any(s["name"] == "train" and s["state"] == "Running" for s in stages) else None

    wait_until(lambda: training("first"), "first's train stage to run", WAIT_S)
    create_job(custom, ns, "second")

    def queued(name: str) -> dict[str, Any] | None:
        obj = get_job(custom, ns, name)
        found = condition(obj, "Queued")
        held = found is not None and found["status"] == "True" and f"{name}-train-1" in found["message"]
        return obj if held and found["reason"] == "Pending" else None

    held = wait_until(lambda: queued("second"), "second's train Job to be queued by Kueue", WAIT_S)
    message = condition(held, "Queued")["message"]  # type: ignore[index]
    assert f"LocalQueue {queue}" in message and GPU in message, message
    assert held["status"]["phase"] == "Training"
    assert stage_status(held, "train")["state"] == "Pending"
    second_train = batch.read_namespaced_job("second-train-1", ns)
    assert second_train.spec.suspend is True and second_train.metadata.labels[QUEUE_LABEL] == queue
    # The printer column `kubectl get dj` shows.
    response = k8s_api.call_api(
        f"/apis/kubedistill.io/v1alpha1/namespaces/{ns}/distillationjobs/second",
        "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
        _preload_content=False,
        _return_http_data_only=True,
    )
    table = json.loads(response.data)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert table["rows"][0]["cells"][columns.index("Queued")] == "True"

    # spec.suspend of a queued job goes through Kueue: the Workload is deactivated, then reactivated.
    def workload_active(active: bool) -> dict[str, Any] | None:
        found = custom.list_namespaced_custom_object(*KUEUE, ns, "workloads")["items"]
        mine = [w for w in found if w["metadata"]["name"].startswith("job-second-train-1-")]
        return mine[0] if mine and mine[0]["spec"].get("active", True) is active else None

    def patch_suspend(value: bool) -> None:
        custom.patch_namespaced_custom_object(
            "kubedistill.io", "v1alpha1", ns, "distillationjobs", "second", {"spec": {"suspend": value}}
        )

    patch_suspend(True)
    stopped = wait_until(lambda: workload_active(False), "second's Workload to be deactivated", WAIT_S)
    assert stopped["metadata"]["annotations"][DEACTIVATED_ANNOTATION] == "true"
    wait_phase(custom, operator, "second", {"Suspended"}, timeout=WAIT_S)
    patch_suspend(False)
    resumed = wait_until(lambda: workload_active(True), "second's Workload to be reactivated", WAIT_S)
    assert DEACTIVATED_ANNOTATION not in (resumed["metadata"].get("annotations") or {})
    wait_until(lambda: queued("second"), "second's train Job to be queued again", WAIT_S)

    release.touch()
    for name in ("first", "second"):
        done = wait_phase(custom, operator, name, {"Succeeded", "Failed"}, timeout=WAIT_S)
        assert done["status"]["phase"] == "Succeeded", done["status"]
        assert condition(done, "Queued")["status"] == "False"  # type: ignore[index]
    history.stop()

    # The second train Job ran only after the first finished: Kueue admitted it then.
    first_done = next(
        v for v in history.of("first-train-1") if any(c["type"] == "Complete" for c in v["status"].get("conditions") or [])
    )  # fmt: skip
    second_versions = history.of("second-train-1")
    started = next(v for v in second_versions if not v["spec"].get("suspend"))
    assert int(started["metadata"]["resourceVersion"]) > int(first_done["metadata"]["resourceVersion"])

    # Every stage Job was created suspended and labelled, and only Kueue ever flipped suspend.
    names = {v["metadata"]["name"] for v in history.versions}
    assert len(names) == 12, names  # six stages × two jobs
    for name in names:
        versions = history.of(name)
        assert (
            versions[0]["spec"]["suspend"] is True and versions[0]["metadata"]["labels"][QUEUE_LABEL] == queue
        )
        operator_manager = creator(versions)
        flips = suspend_flips(versions)
        assert flips and flips[0][0] is False, (name, flips)
        for _, owners in flips:
            assert operator_manager not in owners, (name, flips)
