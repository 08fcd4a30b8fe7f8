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
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from sdk_cli_support import job_body

from kubedistill.api.models import GROUP, VERSION
from serve_support import (
    ALIAS,
    SERVE_WAIT_S,
    Answer,
    ClientLoop,
    GatewayClient,
    Serving,
    condition,
    kept_down,
    served,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CANARY_REQUESTS = 500
FALLBACK_REQUESTS = 20


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
