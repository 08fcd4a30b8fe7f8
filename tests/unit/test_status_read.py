"""A status is read leniently and a spec strictly: an operator rolled back across an upgrade meets status
fields a newer operator wrote, and must go on reconciling instead of failing the job as an invalid spec."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubedistill.api.alias import ModelAlias
from kubedistill.api.models import DistillationJob, Phase, Stage

SPEC: dict[str, Any] = {
    "teacher": {"model": "openai/gpt-4o"},
    "student": {"model": "qwen3-0.6b"},
    "dataset": {"uri": "s3://bucket/prompts.jsonl"},
}


def _job(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"apiVersion": "kubedistill.io/v1alpha1", "kind": "DistillationJob", "metadata": {"name": "j"}}
    return {**body, "spec": spec, **({"status": status} if status is not None else {})}


def test_status_fields_from_a_newer_operator_are_dropped_and_the_rest_is_kept() -> None:
    status = {
        "phase": "Training",
        "shardsReady": 3,
        "conditions": [{"type": "Ready", "status": "False", "reason": "Training", "severity": "Info"}],
        "stages": [{"name": "generate", "state": "Succeeded", "attempts": 1, "nodeName": "gpu-1"}],
        "metrics": {"teacherCostTotal": 1.25, "teacherCacheHitRate": 0.4},
        "progress": {"stage": "train", "percent": 40.0, "etaSeconds": 120},
    }

    job = DistillationJob.model_validate(_job(SPEC, status))

    assert job.status is not None
    assert job.status.phase is Phase.TRAINING
    assert job.status.conditions[0].reason == "Training"
    assert job.status.stages[0].name is Stage.GENERATE
    assert job.status.metrics is not None and job.status.metrics.teacher_cost_total == 1.25
    assert job.status.progress is not None and job.status.progress.percent == 40.0
    assert "shardsReady" not in job.status.to_k8s() and "etaSeconds" not in job.status.to_k8s()["progress"]


def test_an_unknown_spec_field_is_still_an_error() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DistillationJob.model_validate(_job({**SPEC, "teacher": {"model": "openai/gpt-4o", "modle": "x"}}))


def test_an_alias_status_from_a_newer_operator_is_read() -> None:
    alias = ModelAlias.model_validate(
        {
            "apiVersion": "kubedistill.io/v1alpha1",
            "kind": "ModelAlias",
            "metadata": {"name": "smart"},
            "spec": {"target": {"ggufURI": "s3://b/m.gguf"}},
            "status": {
                "endpoint": {"url": "http://gw:4000/v1", "model": "smart", "protocol": "openai"},
                "shadow": {"weight": 5},
            },
        }
    )
    assert alias.status is not None and alias.status.endpoint is not None
    assert alias.status.endpoint.model == "smart"
