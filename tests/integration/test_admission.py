"""The generated CRDs on a real kube-apiserver: bad specs are refused with the field named, good ones
stored with the models' defaults, immutable fields stay put, and the models refuse the same specs.

Each bad spec is checked twice: by the API server (cluster tests, dry-run so nothing persists) and by
the pydantic models as local mode reports them (`kubedistill.errors.error_lines`, no cluster needed);
on the server the set of field paths named must equal local mode's, error for error.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from kubedistill.api import crdgen
from kubedistill.api import models as m
from kubedistill.api.alias import ModelAlias
from kubedistill.errors import error_lines

PLURALS = {"DistillationJob": "distillationjobs", "ModelAlias": "modelaliases"}
MODELS: dict[str, type[BaseModel]] = {"DistillationJob": m.DistillationJob, "ModelAlias": ModelAlias}
DELETE = object()
# "spec.training.bondBeta: Invalid value: ..." — the paths the API server reports, one per error.
_SERVER_PATH = re.compile(r"(spec(?:\.[A-Za-z0-9]+|\[\d+\])+): ")

VALID_JOB: dict[str, Any] = {
    "teacher": {"model": "openai/gpt-4o", "apiKeySecretRef": {"name": "openai", "key": "api-key"}},
    "student": {"model": "qwen3-0.6b"},
    "dataset": {"uri": "s3://prompts/support.jsonl"},
}
VALID_ALIAS: dict[str, Any] = {"target": {"distillationJob": "support-bot"}}


def _changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with dotted paths set (or removed, for DELETE)."""
    spec = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    spec: dict[str, Any]
    field: str  # the path both the API server and the models must name, e.g. spec.curation.topK


def _job(case_id: str, field: str, changes: dict[str, Any]) -> Case:
    return Case(case_id, "DistillationJob", _changed(VALID_JOB, changes), field)


def _alias(case_id: str, field: str, changes: dict[str, Any]) -> Case:
    return Case(case_id, "ModelAlias", _changed(VALID_ALIAS, changes), field)


CASES = [
    _job("teacher-missing", "spec.teacher", {"teacher": DELETE}),
    _job("teacher-model-empty", "spec.teacher.model", {"teacher.model": ""}),
    _job("teacher-unknown-field", "spec.teacher.modle", {"teacher.modle": "gpt-4o"}),
    _job("teacher-concurrency-zero", "spec.teacher.maxConcurrency", {"teacher.maxConcurrency": 0}),
    _job("teacher-timeout-zero", "spec.teacher.timeoutSeconds", {"teacher.timeoutSeconds": 0}),
    _job("teacher-mode-unknown", "spec.teacher.mode", {"teacher.mode": "cheap"}),
    _job(
        "secret-name-invalid",
        "spec.teacher.apiKeySecretRef.name",
        {"teacher.apiKeySecretRef.name": "Bad_Name"},
    ),
    _job("secret-key-missing", "spec.teacher.apiKeySecretRef.key", {"teacher.apiKeySecretRef.key": DELETE}),
    _job("dataset-no-source", "spec.dataset", {"dataset.uri": DELETE}),
    _job("dataset-two-sources", "spec.dataset", {"dataset.prompts": ["hi"]}),
    _job("dataset-too-many-prompts", "spec.dataset.prompts", {"dataset": {"prompts": ["hi"] * 10_001}}),
    _job("dataset-test-fraction", "spec.dataset.testFraction", {"dataset.testFraction": 0.95}),
    _job(
        "dataset-traffic-and-uri", "spec.dataset", {"dataset.fromTraffic": {"alias": "smart", "since": "7d"}}
    ),
    _job(
        "traffic-since-invalid",
        "spec.dataset.fromTraffic.since",
        {"dataset": {"fromTraffic": {"alias": "smart", "since": "last week"}}},
    ),
    _job("samples-too-many", "spec.generation.nSamples", {"generation.nSamples": 64}),
    _job("samples-not-a-number", "spec.generation.nSamples", {"generation.nSamples": "four"}),
    _job("temperature-zero", "spec.generation.temperature", {"generation.temperature": 0}),
    _job("topk-over-default-samples", "spec.curation.topK", {"curation.topK": 5}),
    _job("topk-over-samples", "spec.curation.topK", {"curation.topK": 3, "generation.nSamples": 2}),
    _job("judge-two-kinds", "spec.curation.judge", {"curation.judge": {"llm": {}, "majority": {}}}),
    _job("judge-no-kind", "spec.curation.judge", {"curation.judge": {}}),
    _job(
        "judge-schema-missing",
        "spec.curation.judge.jsonSchema.schema",
        {"curation.judge": {"jsonSchema": {}}},
    ),
    _job(
        "eval-judge-two-kinds",
        "spec.evaluation.judge",
        {"evaluation.judge": {"reference": {}, "majority": {}}},
    ),
    _job("bond-beta-above-one", "spec.training.bondBeta", {"training.bondBeta": 1.5}),
    _job("bond-beta-negative", "spec.training.bondBeta", {"training.bondBeta": -0.1}),
    _job("lora-rank-zero", "spec.training.lora.r", {"training.lora": {"r": 0}}),
    _job(
        "quantization-unsupported", "spec.export.quantizations[1]", {"export.quantizations": ["q8_0", "q2_k"]}
    ),
    _job("quantizations-too-many", "spec.export.quantizations", {"export.quantizations": ["q8_0"] * 4}),
    _job("min-eval-score-above-one", "spec.promotion.minEvalScore", {"promotion.minEvalScore": 2}),
    _job("promotion-alias-invalid", "spec.promotion.alias", {"promotion.alias": "Smart Model"}),
    _job("budget-negative", "spec.budget.maxTeacherCostUSD", {"budget.maxTeacherCostUSD": -1}),
    _job("bucket-too-long", "spec.storage.bucket", {"storage.bucket": "b" * 64}),
    _job("gpus-too-many", "spec.resources.train.gpus", {"resources.train": {"gpus": 17}}),
    _job("retries-too-many", "spec.retries", {"retries": 11}),
    _job("nodes-zero", "spec.training.distributed.nodes", {"training.distributed": {"nodes": 0}}),
    _job(
        "nodes-too-many",
        "spec.training.distributed.nodes",
        {"training.distributed": {"nodes": 65}, "training.gradientAccumulation": 128},
    ),
    _job(
        "gpus-and-procs-per-node",
        "spec.training.distributed",
        {"training.distributed": {"gpusPerNode": 1, "procsPerNode": 2}},
    ),
    _job(
        "accumulation-below-processes",
        "spec.training.gradientAccumulation",
        {"training.distributed": {"nodes": 2, "procsPerNode": 2}, "training.gradientAccumulation": 3},
    ),
    _job("shards-zero", "spec.generation.shards", {"generation.shards": 0}),
    _job(
        "shards-over-prompts",
        "spec.generation.shards",
        {"dataset": {"prompts": ["a", "b"]}, "generation.shards": 3},
    ),
    _job(
        "shards-over-num-prompts", "spec.generation.shards", {"dataset.numPrompts": 2, "generation.shards": 3}
    ),
    _job("deadline-zero", "spec.activeDeadlineSeconds", {"activeDeadlineSeconds": 0}),
    _job("queue-name-not-a-label-value", "spec.queueName", {"queueName": "gpu queue/a"}),
    _job("queue-name-too-long", "spec.queueName", {"queueName": "q" * 64}),
    _alias("alias-target-missing", "spec.target", {"target": DELETE}),
    _alias("alias-target-empty", "spec.target", {"target": {}}),
    _alias("alias-target-both", "spec.target", {"target.ggufURI": "s3://models/student.gguf"}),
    _alias("alias-quantization", "spec.target.quantization", {"target.quantization": "q3_k"}),
    _alias(
        "alias-job-name-invalid", "spec.target.distillationJob", {"target.distillationJob": "Support_Bot"}
    ),
    _alias(
        "canary-weight-over", "spec.canary.weight", {"canary": {"ggufURI": "s3://m/c.gguf", "weight": 101}}
    ),
    _alias(
        "canary-weight-negative", "spec.canary.weight", {"canary": {"ggufURI": "s3://m/c.gguf", "weight": -1}}
    ),
    _alias("canary-weight-missing", "spec.canary.weight", {"canary": {"ggufURI": "s3://m/c.gguf"}}),
    _alias(
        "canary-without-primary",
        "spec.target",
        {"target": DELETE, "canary": {"ggufURI": "s3://m/c.gguf", "weight": 20}},
    ),
    _alias(
        "canary-two-kinds",
        "spec.canary",
        {"canary": {"distillationJob": "a", "ggufURI": "s3://m/c.gguf", "weight": 5}},
    ),
    _alias(
        "fallback-two-kinds",
        "spec.fallback",
        {"fallback": {"distillationJob": "a", "provider": {"model": "openai/gpt-4o"}}},
    ),
    _alias("provider-without-model", "spec.target.provider.model", {"target": {"provider": {}}}),
    _alias("server-parallel-zero", "spec.server.parallel", {"server": {"parallel": 0}}),
    _alias(
        "recording-rate-over-one",
        "spec.recording.sampleRate",
        {"recording": {"enabled": True, "sampleRate": 2}},
    ),
    _alias(
        "recording-destination-not-a-uri",
        "spec.recording.destination",
        {"recording": {"enabled": True, "destination": "bucket/prefix"}},
    ),
    _job("promotion-canary-weight", "spec.promotion.canaryWeight", {"promotion.canaryWeight": 150}),
]


def _body(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": m.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def _server_message(call: Callable[[], Any]) -> tuple[int, str]:
    with pytest.raises(ApiException) as caught:
        call()
    status = json.loads(caught.value.body)
    return caught.value.status, str(status["message"])


# ---------------------------------------------------------------------------------- installation


@pytest.mark.cluster
def test_installed_crds_are_the_generated_ones(k8s_api: client.ApiClient) -> None:
    """conftest installed crds/*.yaml: the server accepted every rule within its CEL cost budget."""
    ext = client.ApiextensionsV1Api(k8s_api)
    for generated in crdgen.all_crds():
        served = k8s_api.sanitize_for_serialization(
            ext.read_custom_resource_definition(generated["metadata"]["name"])
        )
        conditions = {c["type"]: c["status"] for c in served["status"]["conditions"]}
        assert conditions["Established"] == conditions["NamesAccepted"] == "True"
        (version,) = served["spec"]["versions"]
        assert version["schema"] == generated["spec"]["versions"][0]["schema"]
        assert (
            version["additionalPrinterColumns"]
            == generated["spec"]["versions"][0]["additionalPrinterColumns"]
        )

    resources = client.CustomObjectsApi(k8s_api).get_api_resources(m.GROUP, m.VERSION).resources
    found = {r.name: (r.short_names, r.categories) for r in resources}
    assert found["distillationjobs"] == (["dj"], ["kubedistill"])
    assert found["modelaliases"] == (["malias"], ["kubedistill"])


# ------------------------------------------------------------------------------------ rejections


def test_at_least_twenty_cases_cover_both_kinds() -> None:
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == set(PLURALS)


def _local_paths(case: Case) -> set[str]:
    """The fields local mode names for a bad spec, written as `kubedistill` prints them."""
    with pytest.raises(ValidationError) as caught:
        MODELS[case.kind].model_validate(_body(case.kind, "bad", case.spec))
    return {line.split(": ", 1)[0] for line in error_lines(caught.value)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_models_reject_naming_the_field(case: Case) -> None:
    """What local mode does with a job YAML: the same refusal, the same field."""
    assert _local_paths(case) == {case.field}


@pytest.mark.cluster
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_api_server_rejects_naming_the_field(k8s_api: client.ApiClient, case: Case) -> None:
    api = client.CustomObjectsApi(k8s_api)
    code, message = _server_message(
        lambda: api.create_namespaced_custom_object(
            m.GROUP,
            m.VERSION,
            "default",
            PLURALS[case.kind],
            _body(case.kind, "bad", case.spec),
            dry_run="All",
            field_validation="Strict",
        )
    )
    assert code in (400, 422), message
    assert case.field in message, message
    if code == 422:
        # Field by field, the server and local mode name the same paths (400 is a decoding error).
        assert set(_SERVER_PATH.findall(message)) == _local_paths(case), message


# --------------------------------------------------------------------------------- valid objects


@pytest.mark.cluster
def test_valid_job_is_stored_with_the_models_defaults(k8s_api: client.ApiClient, namespace: str) -> None:
    api = client.CustomObjectsApi(k8s_api)
    body = _body("DistillationJob", "support-bot", VALID_JOB)
    api.create_namespaced_custom_object(
        m.GROUP, m.VERSION, namespace, "distillationjobs", body, field_validation="Strict"
    )
    stored = api.get_namespaced_custom_object(
        m.GROUP, m.VERSION, namespace, "distillationjobs", "support-bot"
    )
    assert stored["spec"]["generation"]["nSamples"] == 4
    assert stored["spec"]["curation"] == {"judge": {"llm": {}}, "topK": 2}
    assert stored["spec"]["training"]["bondBeta"] == 0.5
    assert stored["spec"]["export"]["quantizations"] == ["q4_k_m", "q8_0"]
    # The server's defaulting and the models' defaults are one and the same.
    assert stored["spec"] == m.DistillationJob.model_validate(body).spec.to_k8s()


@pytest.mark.cluster
def test_valid_aliases_are_accepted(k8s_api: client.ApiClient, namespace: str) -> None:
    api = client.CustomObjectsApi(k8s_api)
    explicit = {"target": {"ggufURI": "s3://models/student.q8_0.gguf", "baseModel": "qwen3-0.6b"}}
    routed = {
        "target": {"provider": {"model": "openai/gpt-4o", "apiKeySecretRef": {"name": "openai", "key": "k"}}},
        "canary": {"distillationJob": "support-bot", "weight": 20},
        "fallback": {"provider": {"model": "openai/gpt-4o-mini", "baseURL": "http://teacher:8000/v1"}},
        "server": {"replicas": 2, "ctxSize": 2048, "nodeSelector": {"pool": "cpu"}},
        "recording": {"enabled": True, "sampleRate": 0.2, "redact": ["email", r"ACME-\d+"]},
    }
    for name, spec in (("smart", VALID_ALIAS), ("pinned", explicit), ("routed", routed)):
        api.create_namespaced_custom_object(
            m.GROUP,
            m.VERSION,
            namespace,
            "modelaliases",
            _body("ModelAlias", name, spec),
            field_validation="Strict",
        )
    stored = api.get_namespaced_custom_object(m.GROUP, m.VERSION, namespace, "modelaliases", "smart")
    assert stored["spec"]["target"] == {"distillationJob": "support-bot", "quantization": "q4_k_m"}
    for name, spec in (("smart", VALID_ALIAS), ("routed", routed)):
        stored = api.get_namespaced_custom_object(m.GROUP, m.VERSION, namespace, "modelaliases", name)
        # The server's defaulting and the models' defaults agree here too.
        assert stored["spec"] == ModelAlias.model_validate(_body("ModelAlias", name, spec)).spec.to_k8s()


# ---------------------------------------------------------------------------------------- updates


@pytest.mark.cluster
def test_teacher_student_and_dataset_are_immutable(k8s_api: client.ApiClient, namespace: str) -> None:
    api = client.CustomObjectsApi(k8s_api)
    api.create_namespaced_custom_object(
        m.GROUP, m.VERSION, namespace, "distillationjobs", _body("DistillationJob", "frozen", VALID_JOB)
    )

    def patch(spec: dict[str, Any]) -> Any:
        return api.patch_namespaced_custom_object(
            m.GROUP, m.VERSION, namespace, "distillationjobs", "frozen", {"spec": spec}
        )

    for field, change in (
        ("teacher", {"teacher": {"model": "anthropic/claude-sonnet-4"}}),
        ("student", {"student": {"model": "smollm2-135m"}}),
        ("dataset", {"dataset": {"uri": "s3://prompts/other.jsonl"}}),
        ("teacher", {"teacher": {"maxConcurrency": 4}}),
    ):
        code, message = _server_message(functools.partial(patch, change))
        assert code == 422, message
        assert f"spec.{field} is immutable" in message, message

    # Rules still hold on update, and mutable fields do change.
    code, message = _server_message(lambda: patch({"generation": {"nSamples": 1}}))
    assert code == 422 and "spec.curation.topK" in message, message
    # An integer bondBeta reaches the CEL rule as a double and passes.
    updated = patch({"suspend": True, "training": {"steps": 5, "bondBeta": 1}})
    assert updated["spec"]["suspend"] is True
    assert updated["spec"]["training"]["steps"] == 5
    assert updated["spec"]["training"]["bondBeta"] == 1
    assert updated["metadata"]["generation"] == 2


# ----------------------------------------------------------------------------------------- status


@pytest.mark.cluster
def test_status_is_validated_and_feeds_the_printer_columns(k8s_api: client.ApiClient, namespace: str) -> None:
    api = client.CustomObjectsApi(k8s_api)
    api.create_namespaced_custom_object(
        m.GROUP, m.VERSION, namespace, "distillationjobs", _body("DistillationJob", "shown", VALID_JOB)
    )

    def patch_status(status: dict[str, Any]) -> Any:
        return api.patch_namespaced_custom_object_status(
            m.GROUP, m.VERSION, namespace, "distillationjobs", "shown", {"status": status}
        )

    code, message = _server_message(lambda: patch_status({"phase": "Bogus"}))
    assert code == 422 and "status.phase" in message, message

    status = m.DistillationJobStatus(
        phase=m.Phase.TRAINING,
        conditions=[
            m.Condition(type="Ready", status="False", reason="Training", message="training step 40/100")
        ],
        progress=m.Progress(stage=m.Stage.TRAIN, percent=52.5),
        metrics=m.Metrics(teacher_cost_total=1.25, eval_score=0.75),
    )
    written = patch_status(status.to_k8s())
    assert written["metadata"]["generation"] == 1, "a status write must not bump the spec's generation"
    # The status subresource isolates status: a write through the main resource leaves it alone.
    api.patch_namespaced_custom_object(
        m.GROUP, m.VERSION, namespace, "distillationjobs", "shown", {"status": {"phase": "Failed"}}
    )
    stored = api.get_namespaced_custom_object(m.GROUP, m.VERSION, namespace, "distillationjobs", "shown")
    assert stored["status"]["phase"] == "Training"
    assert stored["status"]["conditions"][0]["reason"] == "Training"

    table = k8s_api.call_api(
        f"/apis/{m.GROUP}/{m.VERSION}/namespaces/{namespace}/distillationjobs/shown",
        "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"],
        response_types_map={200: "object"},
        _return_http_data_only=True,
    )
    names = [c["name"] for c in table["columnDefinitions"]]
    (row,) = table["rows"]
    cells = dict(zip(names, row["cells"], strict=True))
    assert cells["Phase"] == "Training"
    assert cells["Progress"] == 52.5
    assert cells["Teacher"] == "openai/gpt-4o"
    assert cells["Student"] == "qwen3-0.6b"
    assert cells["Cost"] == 1.25
    assert cells["Eval"] == 0.75
    assert cells["Message"] == "training step 40/100"
