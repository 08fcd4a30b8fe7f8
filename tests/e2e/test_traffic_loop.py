"""The loop of issue 12 end to end on the test control plane: app → alias (teacher) → recorded requests →
DistillationJob → student → the same alias re-pointed.

`smart` → the fake teacher, through the real LiteLLM gateway, with recording on (destination: the
operator's bucket in the real S3 server). A client sends 200 requests (repeats, and e-mail addresses);
the recorder stores 200 redacted objects. A DistillationJob with `dataset.fromTraffic` runs the REAL
estimate and generate stages (the trainer image, by per-stage `image` overrides, which the local kubelet
maps to `python -m kubedistill_trainer`): they read the recordings, and the estimate reports exactly the
distinct prompts sent. The later stages are the fake stage (no training here; test_real_stages trains),
whose export copies the real tiny Llama GGUF, so promotion re-points `smart` to llama-server, which then
answers. No object in S3 (recordings, dataset, candidates, anything) holds an e-mail address.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubedistill import store
from kubedistill.api.models import GROUP, VERSION
from kubedistill.builders import gateway as gw
from kubedistill.builders.recording import CALLBACK
from kubedistill.settings import GATEWAY_NAME
from kubedistill.traffic import normalise, recordings_prefix
from kubedistill_testing.kubelet.node import DEFAULT_IMAGES
from kubedistill_testing.s3 import RcloneS3
from serve_support import ALIAS, SERVE_WAIT_S, TEACHER_MODEL, Serving, condition, served, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1200)]

EMAIL = "bob.jones@example.com"
REQUESTS = 200
JOB = "from-traffic"
# The real stages start a Python with the trainer's imports, on a machine that runs other suites too.
JOB_WAIT_S = 900.0
(TRAINER_IMAGE,) = DEFAULT_IMAGES  # the kubelet runs this image as the real stage program


def traffic() -> list[str]:
    """200 requests: 130 distinct prompts (50 with an e-mail address), then 70 repeats, some only in case
    and spacing. A prompt differs from the others by more than its e-mail address, which is redacted."""
    distinct = [f"Ticket {i}: my order has not arrived yet" for i in range(80)]
    distinct += [f"Refund {i}: please write to {EMAIL} when it is done" for i in range(50)]
    repeats = distinct[:40] + [f"  {text.upper()} " for text in distinct[80:110]]
    return distinct + repeats


def rolled_out_with_recorder(serving: Serving) -> bool:
    """Every gateway pod runs a config that has the recorder (LiteLLM reads its config once, at start)."""
    ns, sanitize = serving.namespace, serving.core.api_client.sanitize_for_serialization
    try:
        deployment = sanitize(serving.apps.read_namespaced_deployment(GATEWAY_NAME, ns))
        config_map = sanitize(serving.core.read_namespaced_config_map(gw.CONFIG_MAP, ns))
    except ApiException as err:
        if err.status == 404:  # the operator has not created the gateway yet
            return False
        raise
    config = gw.rolled_out_config(deployment, config_map)
    return config is not None and CALLBACK in config


def job_status(serving: Serving) -> dict[str, Any]:
    job = serving.custom.get_namespaced_custom_object(
        GROUP, VERSION, serving.namespace, "distillationjobs", JOB
    )
    status: dict[str, Any] = job.get("status") or {}
    return status


def files_holding(root: RcloneS3, text: str) -> list[str]:
    return [str(p) for p in root.root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_recorded_traffic_is_distilled_and_promoted_to_the_same_alias(
    serving: Serving, serving_s3: RcloneS3
) -> None:
    serving.patch_spec({"recording": {"enabled": True}})
    diagnose: Callable[[], str] = serving.diagnose
    wait_until(
        lambda: (condition(serving.alias(), "Recording") or {}).get("status") == "True",
        "the Recording condition",
        SERVE_WAIT_S,
        diagnose,
    )
    wait_until(
        lambda: rolled_out_with_recorder(serving), "the gateway to run the recorder", SERVE_WAIT_S, diagnose
    )
    alias = serving.settled({"primary": serving.provider()})
    teacher_id = served(alias, "primary")["deploymentId"]  # type: ignore[index]

    # 1. The app's traffic, answered by the teacher and recorded, redacted, in the real S3 server.
    texts = traffic()
    assert len(texts) == REQUESTS
    gateway = serving.gateway()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda text: gateway.chat(ALIAS, text), texts))
    assert all(a.status == 200 and a.deployment_id == teacher_id for a in answers), [
        a for a in answers if a.status != 200
    ][:3]
    prefix = recordings_prefix("s3://artifacts/kubedistill", serving.namespace, ALIAS)
    wait_until(lambda: len(store.list_uris(prefix + "/")) >= REQUESTS, "200 recorded objects", 120, diagnose)
    recorded = store.list_uris(prefix + "/")
    assert len(recorded) == REQUESTS
    # The job is created at once: requests recorded in its creation second must be in its window too.

    # 2. A job distils the recordings: its estimate and generate stages are the real programs.
    real = {"image": f"{TRAINER_IMAGE}:e2e"}
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": JOB},
        "spec": {
            "teacher": {"model": TEACHER_MODEL, "baseURL": serving.teacher.base_url},
            "student": {"model": "qwen3-0.6b"},
            "dataset": {"fromTraffic": {"alias": ALIAS, "since": "1h"}},
            "generation": {"nSamples": 1, "maxTokens": 8},
            "curation": {"judge": {"majority": {}}, "topK": 1},
            "training": {"steps": 2},
            "resources": {"estimate": real, "generate": real},
            "export": {"gguf": True, "quantizations": ["q4_k_m"]},
            "promotion": {"alias": ALIAS, "minEvalScore": 0.0},
        },
    }
    teacher_calls = len(serving.teacher.ok_calls())
    serving.custom.create_namespaced_custom_object(
        GROUP, VERSION, serving.namespace, "distillationjobs", body
    )
    status = wait_until(
        lambda: (s := job_status(serving)).get("phase") in ("Succeeded", "Failed") and s,
        "the job to finish",
        JOB_WAIT_S,
        diagnose,
    )
    assert status["phase"] == "Succeeded", status

    distinct = len({normalise(t) for t in texts})
    assert distinct == 130
    counts = status["estimate"]["traffic"]
    assert (counts["found"], counts["kept"], counts["deduplicated"], counts["rejected"]) == (
        REQUESTS,
        distinct,
        REQUESTS - distinct,
        0,
    ), counts
    assert status["estimate"]["prompts"] == distinct
    # The real generate stage asked the teacher once per kept prompt (nSamples 1), and said so.
    assert len(serving.teacher.ok_calls()) - teacher_calls == distinct
    assert status["metrics"]["teacherCalls"] == distinct

    # 3. Nothing stored anywhere in S3 holds the e-mail address: not the recordings, not the dataset.
    assert files_holding(serving_s3, EMAIL) == []
    assert files_holding(serving_s3, "[EMAIL]"), "the redacted prompts are not in S3 at all"

    # 4. Promotion re-pointed the same alias: new requests reach the student's llama-server.
    alias = serving.settled({"primary": {"distillationJob": JOB}})
    student = served(alias, "primary")
    assert student is not None and student["server"], alias["status"]
    answer = gateway.chat(ALIAS, "Ticket 999: where is my parcel?")
    assert answer.status == 200 and answer.deployment_id == student["deploymentId"], answer
    assert answer.deployment_id != teacher_id
