"""Serving end to end on the test control plane, with the real servers: `model="smart"` answers.

The operator runs the real LiteLLM proxy (the gateway) and llama.cpp's own llama-server as Pods of the
local kubelet (their upstream images map to the binaries built once per machine, see
kubedistill_testing.servers); the tests reach the gateway only through its Service's ClusterIP (the
kubelet's Service proxy) and the gateway reaches the model servers and the teacher by their names, as
in a cluster. Which backend answered is the gateway's own word: its `x-litellm-model-id` header, which
the alias's `status.served[].deploymentId` names.

The story: `smart` → the teacher (a provider target); a DistillationJob (fake stages, but its GGUF is the
real tiny Llama, which the model server's init container fetches from a real S3 server) promotes the
student → llama-server answers, with no failed request during the swap; rollback → the teacher again,
with no failed request; a 20% canary → 10–30% of 500 requests reach the student; fallback → with the
student's server killed, the teacher answers every request. Then the bad inputs, each a clear error while
the running target keeps serving.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from sdk_cli_support import job_body
from serve_support import (
    Answer,
    ClientLoop,
    GatewayClient,
    ServeOperator,
    condition,
    get_alias,
    kept_down,
    served,
    server_deployments,
    wait_until,
)

from kubedistill import store
from kubedistill.api.models import GROUP, VERSION
from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.kubelet import LocalKubelet
from kubedistill_testing.s3 import RcloneS3
from kubedistill_testing.tiny_gguf import tiny_gguf

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

FAKE_IMAGE = "kubedistill.test/serve-fake-stage"
ALIAS = "smart"
TEACHER_MODEL = "fake-teacher"
# The gateway's pods start a Python with LiteLLM's imports on a shared machine: a minute, not seconds.
SERVE_WAIT_S = 300.0
CANARY_REQUESTS = 500
FALLBACK_REQUESTS = 20


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        server.create_bucket("artifacts")
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)  # this process writes the GGUF
        yield server


@pytest.fixture
def teacher() -> Iterator[FakeTeacher]:
    with FakeTeacher({}, models=(TEACHER_MODEL,)) as running:
        yield running


@dataclass
class Serving:
    """The running pieces of one serving test, and the calls its steps share."""

    namespace: str
    core: client.CoreV1Api
    apps: client.AppsV1Api
    custom: client.CustomObjectsApi
    operator: ServeOperator
    kubelet: LocalKubelet
    teacher: FakeTeacher
    gguf_uri: str
    master_key: str

    def provider(self) -> dict[str, Any]:
        return {"provider": {"model": f"openai/{TEACHER_MODEL}", "baseURL": self.teacher.base_url}}

    def alias(self, name: str = ALIAS) -> dict[str, Any]:
        return get_alias(self.custom, self.namespace, name)

    def create_alias(self, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelAlias", "metadata": {"name": name}}
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "modelaliases", {**body, "spec": spec}
        )

    def patch_spec(self, spec: dict[str, Any], name: str = ALIAS) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "modelaliases", name, {"spec": spec}
        )

    def gateway(self) -> GatewayClient:
        return GatewayClient.of(self.core, self.namespace, self.master_key)

    def diagnose(self) -> str:
        parts = [json.dumps(self.alias().get("status"), indent=1)]
        for path in sorted((self.kubelet.root / "logs" / self.namespace).rglob("*.log")):
            parts.append(f"--- {path.parent.name}/{path.name}\n{path.read_text(errors='replace')[-1500:]}")
        parts.append(f"--- operator\n{self.operator.logs()[-3000:]}")
        return "\n".join(parts)

    def settled(self, roles: dict[str, dict[str, Any]], timeout: float = SERVE_WAIT_S) -> dict[str, Any]:
        """Wait until the alias serves exactly these targets (role → target fields), is Ready, its swap
        is over (Progressing not True) and no model server of an earlier target is left."""

        def done() -> dict[str, Any] | None:
            assert self.operator.alive(), self.operator.logs()[-4000:]
            alias = self.alias()
            ready, progressing = condition(alias, "Ready"), condition(alias, "Progressing")
            now = {s["role"]: s for s in (alias.get("status") or {}).get("served") or []}
            if set(now) != set(roles) or not (ready and ready["status"] == "True"):
                return None
            if progressing and progressing["status"] == "True":
                return None
            for role, target in roles.items():
                shown = {**now[role]["target"], "weight": now[role]["weight"]}
                if any(shown.get(key) != value for key, value in target.items()):
                    return None
            wanted = {s["server"] for s in now.values() if s.get("server")}
            if set(server_deployments(self.apps, self.namespace, ALIAS)) != wanted:
                return None
            return alias

        found: dict[str, Any] = wait_until(done, f"{ALIAS} to serve {roles}", timeout, self.diagnose)
        return found


@pytest.fixture
def serving(
    control_plane: Path,
    kubelet: LocalKubelet,
    serving_images: None,
    namespace: str,
    k8s_api: client.ApiClient,
    s3: RcloneS3,
    teacher: FakeTeacher,
    tmp_path: Path,
) -> Iterator[Serving]:
    """The operator with its gateway, S3 holding the tiny Llama's GGUF, and `smart` → the teacher."""
    core = client.CoreV1Api(k8s_api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-credentials"},
            "stringData": {S3_ACCESS_KEY_ENV: s3.access_key, S3_SECRET_KEY_ENV: s3.secret_key},
        },
    )
    master_key = "sk-" + secrets.token_urlsafe(18)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "gateway-master"}, "stringData": {"master-key": master_key}}
    )
    gguf_uri = f"s3://artifacts/models/{uuid.uuid4().hex[:8]}/tiny-llama-q8_0.gguf"
    store.put_file(tiny_gguf(), gguf_uri)
    kubelet.images[FAKE_IMAGE] = [sys.executable, "-m", "kubedistill_testing.fake_stage"]
    operator = ServeOperator(
        control_plane,
        namespace,
        tmp_path,
        {
            **s3.env(),
            "KUBEDISTILL_TRAINER_IMAGE": f"{FAKE_IMAGE}:1",
            "KUBEDISTILL_STORAGE_BUCKET": "artifacts",
            "KUBEDISTILL_STORAGE_ENDPOINT": s3.env()["KUBEDISTILL_S3_ENDPOINT"],
            "KUBEDISTILL_STORAGE_SECRET": "s3-credentials",
            "KUBEDISTILL_GATEWAY_MASTER_KEY_SECRET": "gateway-master",
            # The fake export copies the real GGUF where the job says its student is.
            "KUBEDISTILL_STAGE_ENV": json.dumps({"KUBEDISTILL_FAKE_GGUF": gguf_uri}),
        },
    ).start()
    running = Serving(
        namespace,
        core,
        client.AppsV1Api(k8s_api),
        client.CustomObjectsApi(k8s_api),
        operator,
        kubelet,
        teacher,
        gguf_uri,
        master_key,
    )
    try:
        running.create_alias(ALIAS, {"target": running.provider()})  # day one: the teacher serves `smart`
        yield running
        # Deleted while its operator runs (which finalizes it): the next test's `smart` owns the name.
        running.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelaliases", ALIAS)
        wait_until(lambda: not alias_exists(running), f"{ALIAS} to be deleted", 120, running.diagnose)
    finally:
        operator.stop()


def alias_exists(serving: Serving) -> bool:
    try:
        serving.alias()
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def answered_by(answers: list[Answer], deployment_id: str) -> int:
    return sum(1 for a in answers if a.status == 200 and a.deployment_id == deployment_id)


def report(what: str, loop: ClientLoop) -> dict[str, Any]:
    """Print the figures of a swap under load (the lead quotes them) and return them."""
    figures = {"swap": what, **loop.summary()}
    print(f"\nserve swap figures: {json.dumps(figures)}")
    return figures


def primary_id(alias: dict[str, Any]) -> str:
    entry = served(alias, "primary")
    assert entry is not None, alias.get("status")
    return str(entry["deploymentId"])


def promote_student(serving: Serving, job: str) -> dict[str, Any]:
    """A DistillationJob of fake stages (with the real GGUF) that promotes its student to `smart`."""
    body = job_body(
        job,
        export={"gguf": True, "quantizations": ["q4_k_m"]},
        promotion={"alias": ALIAS, "minEvalScore": 0.0},
    )
    created: dict[str, Any] = serving.custom.create_namespaced_custom_object(
        GROUP, VERSION, serving.namespace, "distillationjobs", body
    )
    return created


def test_smart_is_served_by_the_teacher_then_the_student_with_rollback_canary_and_fallback(
    serving: Serving, control_plane: Path
) -> None:
    teacher_only = {"primary": serving.provider()}
    alias = serving.settled(teacher_only)
    endpoint = alias["status"]["endpoint"]
    assert endpoint["model"] == ALIAS
    assert endpoint["url"] == f"http://kubedistill-gateway.{serving.namespace}.svc.cluster.local:4000/v1"
    gateway = serving.gateway()

    # 1. The teacher answers `smart`, through the gateway, which its master key guards.
    teacher_id = primary_id(alias)
    calls_before = len(serving.teacher.ok_calls())
    answer = gateway.chat(ALIAS, "Where is my parcel?")
    assert answer.status == 200, answer.text
    assert answer.deployment_id == teacher_id
    assert len(serving.teacher.ok_calls()) == calls_before + 1
    unauthorized = GatewayClient(gateway.host, gateway.port, "sk-wrong").chat(ALIAS, "hi")
    assert unauthorized.status in (400, 401, 403), unauthorized.text

    # 2. A DistillationJob promotes the student: llama-server answers; no request fails during the swap.
    student = {"distillationJob": "tickets"}
    with ClientLoop(gateway, ALIAS) as repoint:
        promote_student(serving, "tickets")
        alias = serving.settled({"primary": student})
    figures = report("re-point teacher -> student (promotion)", repoint)
    assert figures["failed"] == 0, repoint.failures()[:5]
    student_id = primary_id(alias)
    primary = served(alias, "primary")
    assert primary and primary["server"] and primary["readyReplicas"] >= 1
    assert alias["status"]["ggufURI"].startswith(f"s3://artifacts/kubedistill/{serving.namespace}/tickets/")
    answer = gateway.chat(ALIAS, "Where is my parcel?")
    assert answer.status == 200 and answer.deployment_id == student_id, answer
    assert json.loads(answer.text)["choices"][0]["message"]["role"] == "assistant"
    assert answered_by(repoint.answers, teacher_id) and answered_by(repoint.answers, student_id)

    # 3. Rollback: the teacher again; no request fails.
    with ClientLoop(gateway, ALIAS) as rollback:
        result = subprocess.run(
            [sys.executable, "-c", "from kubedistill.cli import main; main()", "alias", "rollback", ALIAS,
             "-n", serving.namespace, "--kubeconfig", str(control_plane)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        alias = serving.settled(teacher_only)
    figures = report("rollback student -> teacher", rollback)
    assert figures["failed"] == 0, rollback.failures()[:5]
    answer = gateway.chat(ALIAS, "Where is my parcel?")
    assert answer.status == 200 and answer.deployment_id == primary_id(alias), answer

    # 4. A 20% canary of the student: between 10% and 30% of 500 requests reach it.
    serving.patch_spec({"canary": {**student, "weight": 20}})
    alias = serving.settled({"primary": serving.provider(), "canary": {**student, "weight": 20}})
    canary = served(alias, "canary")
    assert canary is not None
    answers = [gateway.chat(ALIAS, f"Ticket {i}") for i in range(CANARY_REQUESTS)]
    assert all(a.status == 200 for a in answers), [a.text for a in answers if a.status != 200][:3]
    share = answered_by(answers, canary["deploymentId"]) / CANARY_REQUESTS
    print(f"\nserve canary: {share:.1%} of {CANARY_REQUESTS} requests reached the student (weight 20)")
    assert 0.10 <= share <= 0.30, share

    # 5. Fallback: the student's server killed (again each time it restarts) → the teacher answers.
    serving.patch_spec(
        {"target": {"provider": None, **student}, "canary": None, "fallback": serving.provider()}
    )
    alias = serving.settled({"primary": student, "fallback": serving.provider()})
    fallback = served(alias, "fallback")
    primary = served(alias, "primary")
    assert fallback is not None and primary is not None and primary["server"]
    with kept_down(serving.core, serving.namespace, primary["server"]) as kills:
        wait_until(lambda: kills, "the student's server to be killed", 60, serving.diagnose)
        answers = [gateway.chat(ALIAS, f"Ticket {i}: refund?") for i in range(FALLBACK_REQUESTS)]
    assert all(a.status == 200 for a in answers), [a.text for a in answers if a.status != 200][:3]
    assert answered_by(answers, fallback["deploymentId"]) == FALLBACK_REQUESTS, {
        a.deployment_id for a in answers
    }


def get_job(serving: Serving, name: str) -> dict[str, Any]:
    found: dict[str, Any] = serving.custom.get_namespaced_custom_object(
        GROUP, VERSION, serving.namespace, "distillationjobs", name
    )
    return found


def admission_error(serving: Serving, name: str, spec: dict[str, Any]) -> str:
    try:
        serving.create_alias(name, spec)
    except ApiException as err:
        assert err.status == 422, err.body
        return str(err.body)
    raise AssertionError(f"the API server admitted {spec}")


def test_bad_targets_are_clear_errors_and_the_running_target_keeps_serving(serving: Serving) -> None:
    teacher_only = {"primary": serving.provider()}
    alias = serving.settled(teacher_only)
    gateway = serving.gateway()
    teacher_id = primary_id(alias)

    # Refused at admission, naming the field.
    assert "weight" in admission_error(serving, "heavy", {"target": serving.provider(),
                                                          "canary": {**serving.provider(), "weight": 101}})  # fmt: skip
    assert "target" in admission_error(serving, "headless", {"canary": {**serving.provider(), "weight": 20}})

    # A job that does not exist, and one that failed: a condition that names it; the teacher still serves.
    failing = job_body("doomed", dataset={"uri": "s3://artifacts/no-such-dataset.jsonl"})
    serving.custom.create_namespaced_custom_object(
        GROUP, VERSION, serving.namespace, "distillationjobs", failing
    )
    wait_until(
        lambda: (get_job(serving, "doomed").get("status") or {}).get("phase") == "Failed",
        "job doomed to fail (its dataset does not exist)",
        SERVE_WAIT_S,
        serving.diagnose,
    )
    for job in ("no-such-job", "doomed"):
        serving.patch_spec({"target": {"provider": None, "distillationJob": job}})

        def refused(job: str = job) -> dict[str, Any] | None:
            found = serving.alias()
            progressing = condition(found, "Progressing") or {}
            ready = condition(found, "Ready") or {}
            said = f"{progressing.get('message', '')} {ready.get('message', '')}"
            return found if job in said and progressing.get("status") != "True" else None

        wait_until(refused, f"the alias to say why {job} cannot be served", SERVE_WAIT_S, serving.diagnose)
        answer = gateway.chat(ALIAS, "still there?")
        assert answer.status == 200 and answer.deployment_id == teacher_id, answer
        serving.patch_spec({"target": {"distillationJob": None, **serving.provider()}})
        serving.settled(teacher_only)

    # A GGUF that is not in S3: the fetch fails, the alias says why, the teacher keeps serving.
    missing = serving.gguf_uri.replace("tiny-llama", "missing")
    serving.patch_spec({"target": {"provider": None, "ggufURI": missing}})

    def fetch_failed() -> dict[str, Any] | None:
        found = serving.alias()
        progressing = condition(found, "Progressing") or {}
        return (
            found
            if progressing.get("status") == "False" and missing in progressing.get("message", "")
            else None
        )

    found = wait_until(fetch_failed, "the alias to report the missing GGUF", SERVE_WAIT_S, serving.diagnose)
    assert condition(found, "Progressing")["reason"], found["status"]  # type: ignore[index]
    answer = gateway.chat(ALIAS, "still there?")
    assert answer.status == 200 and answer.deployment_id == teacher_id, answer
