"""The Distiller SDK's pure parts: the seed's keywords → the CRD's fields, dataset resolution, the dicts it
returns, typed errors, and the offline estimate and catalogs (no cluster needed for those)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubedistill import Distiller, sdk
from kubedistill.api.alias import ModelAlias
from kubedistill.api.models import DistillationJob
from kubedistill.errors import Conflict, DistillerError, Invalid, NotFound, error_lines, from_status


def test_create_keywords_map_to_the_spec_with_the_seed_defaults() -> None:
    body = sdk.job_body(
        "ticket-triage v1", {"uri": "s3://b/datasets/x.jsonl"}, "openai/gpt-4o", "llama-3.2-1b"
    )
    job = DistillationJob.model_validate(body)  # what the API server will accept
    assert job.metadata.name == "ticket-triage-v1"
    assert body["metadata"]["annotations"] == {sdk.DISPLAY_NAME_ANNOTATION: "ticket-triage v1"}
    spec = job.spec
    assert spec.dataset.num_prompts == 500 and spec.generation.n_samples == 4
    assert spec.training.steps == 100 and spec.training.bond_beta == 0.5 and spec.training.bond_gamma == 0.1
    assert spec.export.gguf is True and spec.export.quantizations == ["q4_k_m", "q8_0"]
    assert spec.curation.top_k == 2 and spec.curation.judge.kind == "llm"


def test_every_option_lands_on_its_field() -> None:
    body = sdk.job_body(
        "x",
        {"configMapRef": {"name": "d", "key": "dataset.jsonl"}},
        "openai/gpt-4o-mini",
        "qwen3-0.6b",
        num_prompts=None,
        n_samples=6,
        training_steps=7,
        bond_beta=0.2,
        bond_gamma=0.3,
        export_gguf=False,
        quantization_types=["q8_0"],
        top_k=3,
        judge="majority",
        teacher_base_url="http://127.0.0.1:9/v1",
        teacher_api_key_secret="openai/api-key",
        system_prompt="Answer with one word.",
        max_tokens=16,
        temperature=0.5,
        test_fraction=0.2,
        alias="smart",
        min_eval_score=0.7,
        max_teacher_cost_usd=3.5,
        labels={"team": "a"},
        spec_overrides={"training": {"learningRate": 0.001}, "retries": 0},
    )
    spec = DistillationJob.model_validate(body).spec
    assert spec.dataset.num_prompts is None and spec.dataset.test_fraction == 0.2
    assert spec.teacher.base_url == "http://127.0.0.1:9/v1"
    assert spec.teacher.api_key_secret_ref is not None and spec.teacher.api_key_secret_ref.key == "api-key"
    assert (spec.generation.n_samples, spec.generation.max_tokens, spec.generation.temperature) == (
        6,
        16,
        0.5,
    )
    assert spec.generation.system_prompt == "Answer with one word."
    assert spec.curation.judge.kind == "majority" and spec.curation.top_k == 3
    assert (spec.training.steps, spec.training.bond_beta, spec.training.bond_gamma) == (7, 0.2, 0.3)
    assert spec.training.learning_rate == 0.001 and spec.retries == 0
    assert spec.export.gguf is False and spec.export.quantizations == ["q8_0"]
    assert spec.promotion.alias == "smart" and spec.promotion.min_eval_score == 0.7
    assert spec.budget.max_teacher_cost_usd == 3.5
    assert body["metadata"] == {"name": "x", "labels": {"team": "a"}}


def test_a_secret_reference_must_name_a_key() -> None:
    with pytest.raises(Invalid, match="secret-name/key"):
        sdk.job_body("x", {"prompts": ["a"]}, "t", "s", teacher_api_key_secret="openai")


def test_a_name_without_letters_or_digits_is_invalid() -> None:
    with pytest.raises(Invalid, match=r"metadata\.name"):
        sdk.job_id("  !! ")


@pytest.mark.parametrize(
    ("dataset_id", "keys", "store", "expected"),
    [
        ("s3://b/k.jsonl", ["dataset.jsonl"], None, {"uri": "s3://b/k.jsonl"}),
        (
            "tickets",
            ["rows.jsonl"],
            "s3://b/datasets",
            {"configMapRef": {"name": "tickets", "key": "rows.jsonl"}},
        ),
        (
            "tickets",
            ["a", "dataset.jsonl"],
            None,
            {"configMapRef": {"name": "tickets", "key": "dataset.jsonl"}},
        ),
        ("tickets", None, "s3://b/datasets/", {"uri": "s3://b/datasets/tickets.jsonl"}),
    ],
)
def test_dataset_id_resolution_order(
    dataset_id: str, keys: list[str] | None, store: str | None, expected: dict[str, Any]
) -> None:
    assert sdk.dataset_spec(dataset_id, keys, store) == expected


def test_dataset_nowhere_is_not_found_and_ambiguous_configmap_invalid() -> None:
    with pytest.raises(NotFound, match="KUBEDISTILL_DATASETS_URI"):
        sdk.dataset_spec("tickets", None, None)
    with pytest.raises(Invalid, match=r"dataset\.jsonl"):
        sdk.dataset_spec("tickets", ["a", "b"], None)


STATUS: dict[str, Any] = {
    "phase": "Succeeded",
    "progress": {"stage": None, "percent": 100.0},
    "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": "all stages done"}],
    "artifacts": {
        "adapterURI": "s3://b/ns/j/u/train/adapter/",
        "mergedURI": "s3://b/ns/j/u/export/merged/",
        "ggufURIs": {
            "q4_k_m": "s3://b/ns/j/u/export/model-q4_k_m.gguf",
            "q8_0": "s3://b/ns/j/u/export/model-q8_0.gguf",
        },
        "evalURI": "s3://b/ns/j/u/evaluate/eval.jsonl",
    },
    "metrics": {
        "teacherCostTotal": 2.48,
        "studentLossFinal": 0.31,
        "trainingTimeSec": 412.0,
        "evalScore": 0.9,
    },
}


def test_artifacts_have_the_seed_shape() -> None:
    arts = sdk.artifacts_view({"metadata": {"name": "j"}, "status": STATUS})
    assert arts["adapter_path"] == "s3://b/ns/j/u/train/adapter/"
    assert set(arts["gguf_paths"]) == {"q4_k_m", "q8_0"}
    assert arts["metrics"]["teacher_cost_total"] == 2.48
    assert arts["metrics"]["student_loss_final"] == 0.31
    assert arts["metrics"]["training_time_sec"] == 412.0


def test_artifacts_carry_the_saving_against_sync_prices() -> None:
    arts = sdk.artifacts_view({"metadata": {"name": "j"}, "status": {"metrics": {"teacherSavingUSD": 1.25}}})
    assert arts["metrics"]["teacher_saving_usd"] == 1.25


@pytest.mark.parametrize(
    ("phase", "coarse"),
    [(None, "pending"), ("Estimating", "pending"), ("Training", "running"), ("Promoting", "running"),
     ("Succeeded", "succeeded"), ("Failed", "failed"), ("Suspended", "suspended")],
)  # fmt: skip
def test_coarse_status(phase: str | None, coarse: str) -> None:
    assert sdk.coarse_status(phase) == coarse


def test_summary_carries_id_status_phase_and_message() -> None:
    obj = {
        "metadata": {
            "name": "ticket-triage-v1",
            "namespace": "a",
            "annotations": {sdk.DISPLAY_NAME_ANNOTATION: "T v1"},
        },
        "spec": {"teacher": {"model": "openai/gpt-4o"}, "student": {"model": "qwen3-0.6b"}},
        "status": {
            **STATUS,
            "phase": "Training",
            "progress": {"stage": "train", "percent": 60.0, "detail": "step 3/5"},
        },
    }
    s = sdk.summary(obj)
    assert (s["id"], s["name"], s["status"], s["phase"], s["stage"]) == (
        "ticket-triage-v1",
        "T v1",
        "running",
        "Training",
        "train",
    )
    assert s["progress"] == 60.0 and s["message"] == "all stages done"


def test_alias_target_is_job_or_explicit_and_valid() -> None:
    explicit = sdk.alias_target("s3://a/adapter/", "s3://a/m.gguf", "qwen3-0.6b", None)
    assert explicit == {
        "ggufURI": "s3://a/m.gguf",
        "adapterURI": "s3://a/adapter/",
        "baseModel": "qwen3-0.6b",
    }
    for target in (explicit, sdk.alias_target(None, None, None, "job-a")):
        ModelAlias.model_validate({"metadata": {"name": "smart"}, "spec": {"target": target}})


def test_server_errors_become_typed_errors_with_the_servers_message() -> None:
    body = json.dumps({"kind": "Status", "message": 'distillationjobs "x" not found', "reason": "NotFound"})
    err = from_status(404, body)
    assert isinstance(err, NotFound) and err.message == 'distillationjobs "x" not found' and err.status == 404
    assert isinstance(from_status(409, "{}", "Conflict"), Conflict)
    assert isinstance(from_status(422, None, "Unprocessable"), Invalid)
    generic = from_status(500, "not json", "Internal")
    assert type(generic) is DistillerError and generic.message == "Internal"


def test_validation_errors_name_the_field_like_the_api_server() -> None:
    doc = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "x"},
        "spec": {
            "teacher": {"model": "m", "modle": "typo"},
            "student": {"model": "s"},
            "dataset": {"prompts": ["a"]},
            "generation": {"nSamples": 2},
            "curation": {"topK": 3},
            "export": {"quantizations": ["q8_0", "q2_k"]},
        },
    }
    with pytest.raises(ValidationError) as caught:
        DistillationJob.model_validate(doc)
    lines = error_lines(caught.value)
    assert any(line.startswith("spec.teacher.modle: ") for line in lines), lines
    assert any(line.startswith("spec.export.quantizations[1]: ") for line in lines), lines
    doc["spec"]["teacher"] = {"model": "m"}
    doc["spec"]["export"] = {}
    with pytest.raises(ValidationError) as caught:
        DistillationJob.model_validate(doc)
    assert error_lines(caught.value) == [
        "spec.curation.topK: curation.topK must not exceed generation.nSamples"
    ]


def test_estimate_and_catalogs_work_offline() -> None:
    d = Distiller(namespace="nowhere", kubeconfig="/nonexistent/kubeconfig")
    est = d.estimate(student_model="llama-3.2-1b", num_prompts=500, n_samples=4)
    assert est["estimated_cost"] > 0 and est["teacher_calls"] == 500  # openai supports n: one call a prompt
    assert est["breakdown"]["teacher"] == "openai/gpt-4o" and est["sufficient"] is True
    more = d.estimate(student_model="llama-3.2-1b", num_prompts=1000, n_samples=4)
    assert more["teacher_cost"] == pytest.approx(2 * est["teacher_cost"])
    rows = [{"id": "a", "prompt": "x" * 4000}]
    assert d.estimate("qwen3-0.6b", 1, 1, rows=rows)["input_tokens"] > 1000
    teachers = {t["id"]: t for t in d.teacher_models()}
    assert teachers["openai/gpt-4o"]["provider"] == "openai"
    assert teachers["openai/gpt-4o"]["base_url"].startswith("https://")
    students = {s["id"]: s for s in d.student_models()}
    assert students["qwen3-0.6b"]["params"] == "0.6B" and students["llama-3.2-1b"]["hf_id"].startswith(
        "meta-llama/"
    )


def test_namespace_comes_from_the_kubeconfig_context_like_kubectl(tmp_path: Any) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "a",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}},
                    {"name": "b", "context": {"cluster": "c", "user": "u"}},
                ],
            }
        )
    )
    assert Distiller(kubeconfig=kubeconfig).namespace == "team-a"
    assert Distiller(kubeconfig=kubeconfig, context="b").namespace == "default"
    assert Distiller(namespace="x", kubeconfig=kubeconfig).namespace == "x"
