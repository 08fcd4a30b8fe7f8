"""Argo CD health checks (deploy/argocd/health/*.lua) run in Lua 5.1 — gopher-lua's dialect — over sample
objects, with only the globals Argo CD gives a health script; and the GitOps examples' structure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedistill_testing import argocd

ROOT = Path(__file__).resolve().parents[2]
HEALTH = ROOT / "deploy" / "argocd" / "health"
GITOPS = ROOT / "examples" / "gitops"


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    assert obj["kind"] == kind
    return argocd.health(obj)


def job(
    status: dict[str, Any] | None = None, *, generation: int = 1, suspend: bool = False
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "support-bot", "namespace": "ml", "generation": generation},
        "spec": {"suspend": suspend},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(kind: str, status: str, message: str = "", reason: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "message": message, "reason": reason}


@pytest.mark.parametrize(
    ("obj", "expected_status", "expected_message"),
    [
        (job(), "Progressing", "Waiting for the kubedistill operator"),
        (job({"conditions": []}), "Progressing", "Waiting for the kubedistill operator"),
        (job({"phase": "Generating", "observedGeneration": 1}), "Progressing", "Generating"),
        (
            job(
                {
                    "phase": "Training",
                    "observedGeneration": 1,
                    "progress": {"stage": "train", "percent": 57.4},
                }
            ),
            "Progressing",
            "Training (57%)",
        ),
        (
            job({"phase": "Succeeded", "observedGeneration": 1}, generation=2),
            "Progressing",
            "Waiting for the operator to observe generation 2",
        ),
        (job({"phase": "Succeeded", "observedGeneration": 1}), "Healthy", "Distillation succeeded"),
        (
            job({"phase": "Succeeded", "metrics": {"evalScore": 0.8125}}),
            "Healthy",
            "Distillation succeeded (eval score 0.812)",
        ),
        (job({"phase": "Suspended"}, suspend=True), "Suspended", "Suspended (spec.suspend is true)"),
        (job({"phase": "Generating"}, suspend=True), "Suspended", "Suspended (spec.suspend is true)"),
        (
            job(
                {
                    "phase": "Failed",
                    "conditions": [
                        cond("Ready", "False", "not ready"),
                        cond("Failed", "True", "train: CUDA out of memory", "StageFailed"),
                    ],
                }
            ),
            "Degraded",
            "train: CUDA out of memory",
        ),
        (
            job({"phase": "Failed", "conditions": [cond("Ready", "False", "budget exceeded: $12 > $10")]}),
            "Degraded",
            "budget exceeded: $12 > $10",
        ),
        (
            job(
                {"phase": "Failed", "stages": [{"name": "export", "state": "Failed", "message": "disk full"}]}
            ),
            "Degraded",
            "export: disk full",
        ),
        (job({"phase": "Failed"}), "Degraded", "The distillation job failed"),
    ],
)
def test_distillation_job_health(obj: dict[str, Any], expected_status: str, expected_message: str) -> None:
    assert health("DistillationJob", obj) == (expected_status, expected_message)


def alias(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "ModelAlias",
        "metadata": {"name": "smart", "generation": generation},
        "spec": {"target": {"distillationJob": "support-bot"}},
    }
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize(
    ("obj", "expected_status", "expected_message"),
    [
        (alias(None), "Progressing", "Waiting for the kubedistill operator to resolve the alias"),
        (
            alias({"ggufURI": "s3://b/ml/sb/u/export/q4_k_m.gguf", "conditions": [cond("Ready", "True")]}),
            "Healthy",
            "Serving s3://b/ml/sb/u/export/q4_k_m.gguf",
        ),
        (
            alias({"observedGeneration": 1, "conditions": [cond("Ready", "True")]}, generation=3),
            "Progressing",
            "Waiting for the kubedistill operator to resolve the alias",
        ),
        (
            alias(
                {"conditions": [cond("Ready", "False", 'job "support-bot" has not succeeded', "JobNotReady")]}
            ),
            "Degraded",
            'job "support-bot" has not succeeded',
        ),
        (alias({"conditions": [cond("Ready", "False", "", "TargetMissing")]}), "Degraded", "TargetMissing"),
        (alias({"conditions": [cond("Ready", "Unknown", "resolving")]}), "Progressing", "resolving"),
        (
            alias(
                {
                    "conditions": [
                        cond("Ready", "True"),
                        cond("Progressing", "True", "primary: waiting for smart-1"),
                    ]
                }
            ),
            "Progressing",
            "primary: waiting for smart-1",
        ),
        (
            alias(
                {
                    "endpoint": {"url": "http://gw/v1", "model": "smart"},
                    "served": [{"role": "primary", "deploymentId": "ns/smart-0"}],
                    "conditions": [
                        cond("Ready", "True"),
                        cond("Progressing", "False", "primary: fetch: s3://x does not exist", "FetchFailed"),
                    ],
                }
            ),
            "Degraded",
            "primary: fetch: s3://x does not exist (still serving model=smart via ns/smart-0)",
        ),
        (
            alias(
                {
                    "served": [{"role": "primary", "deploymentId": "ns/smart-0"}],
                    "conditions": [cond("Ready", "True"), cond("Progressing", "False", "done", "Complete")],
                }
            ),
            "Healthy",
            "Serving model=smart via ns/smart-0",
        ),
    ],
)
def test_model_alias_health(obj: dict[str, Any], expected_status: str, expected_message: str) -> None:
    assert health("ModelAlias", obj) == (expected_status, expected_message)


def test_the_argocd_cm_patch_is_generated_from_the_lua_files() -> None:
    spec = importlib.util.spec_from_file_location(
        "argocd_generate", ROOT / "deploy" / "argocd" / "generate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["argocd_generate"] = module
    spec.loader.exec_module(module)
    committed = (ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml").read_text()
    assert committed == module.render(), "stale: run python deploy/argocd/generate.py"
    data = yaml.safe_load(committed)["data"]
    assert data == {
        "resource.customizations.health.kubedistill.io_DistillationJob": (
            HEALTH / "DistillationJob.lua"
        ).read_text(),
        "resource.customizations.health.kubedistill.io_ModelAlias": (HEALTH / "ModelAlias.lua").read_text(),
    }


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def wave(obj: dict[str, Any]) -> int:
    return int(obj["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


def applications() -> dict[str, dict[str, Any]]:
    docs = [d for p in sorted(GITOPS.rglob("*.yaml")) for d in load_all(p)]
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Application"}


def test_gitops_applications_install_the_chart_before_the_jobs() -> None:
    apps = applications()
    root, operator, jobs = apps["kubedistill-root"], apps["kubedistill"], apps["kubedistill-jobs"]
    assert (ROOT / root["spec"]["source"]["path"]).is_dir()
    assert operator["spec"]["source"]["path"] == "charts/kubedistill"
    assert (ROOT / operator["spec"]["source"]["path"] / "Chart.yaml").is_file()
    assert operator["spec"]["source"]["helm"]["valuesObject"]["crds"] == {"enabled": True, "keep": True}
    # CRDs (in the operator's Application) land first; jobs only sync once their kinds exist.
    assert wave(operator) < wave(jobs)
    assert "SkipDryRunOnMissingResource=true" in jobs["spec"]["syncPolicy"]["syncOptions"]
    assert "ServerSideApply=true" in operator["spec"]["syncPolicy"]["syncOptions"]


def test_gitops_jobs_are_valid_custom_resources() -> None:
    from kubedistill.api.alias import ModelAlias
    from kubedistill.api.models import DistillationJob

    job_dir = ROOT / applications()["kubedistill-jobs"]["spec"]["source"]["path"]
    docs = [d for p in sorted(job_dir.glob("*.yaml")) for d in load_all(p)]
    models = {"DistillationJob": DistillationJob, "ModelAlias": ModelAlias}
    assert {d["kind"] for d in docs} == set(models)
    for doc in docs:
        models[doc["kind"]].model_validate(doc)


def test_the_application_health_check_follows_the_app_status() -> None:
    script = yaml.safe_load((GITOPS / "argocd-cm-application-health.yaml").read_text())["data"]
    src = script["resource.customizations.health.argoproj.io_Application"]
    app = {"status": {"health": {"status": "Degraded", "message": "crashloop"}}}
    assert argocd.run_health_script(src, app) == ("Degraded", "crashloop")
    assert argocd.run_health_script(src, {}) == ("Progressing", "")
