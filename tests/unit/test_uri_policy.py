"""The URI and image policy, pure: scopes from settings, each refused field named, the default scope."""

from __future__ import annotations

from typing import Any

import pytest

from kubedistill.api.alias import CanaryTarget, FallbackTarget, ServerSpec
from kubedistill.api.models import AliasTarget, DistillationJob, ModelAliasSpec, Stage
from kubedistill.builders import artifact_root, build_stage_manifests
from kubedistill.domain.uri_policy import Access, alias_uris, alias_violations, job_violations, resolve
from kubedistill.settings import Settings, from_mapping

SCOPES = (
    '[{"namespace": "team-a", "bucket": "teams", "prefix": "a/", "secret": "s3-team-a"},'
    ' {"namespaceSelector": {"matchLabels": {"kubedistill.io/team": "b"}}, "bucket": "teams", "prefix": "b",'
    '  "secret": "s3-team-b", "serviceAccount": "team-b-s3"}]'
)
BASE = {
    "KUBEDISTILL_STORAGE_BUCKET": "shared",
    "KUBEDISTILL_STORAGE_SECRET": "s3-shared",
    "KUBEDISTILL_STORAGE_SCOPES": SCOPES,
    "KUBEDISTILL_SHARED_READ_URIS": "s3://models-cache/",
    "KUBEDISTILL_ALLOW_DEFAULT_SCOPE": "false",
}


def _job(namespace: str = "team-a", **spec: Any) -> DistillationJob:
    body = {
        "teacher": {"model": "openai/gpt-4o"},
        "student": {"model": "qwen3-0.6b"},
        "dataset": {"uri": "s3://teams/a/prompts.jsonl"},
        **spec,
    }
    return DistillationJob.model_validate(
        {"metadata": {"name": "j", "namespace": namespace, "uid": "u1"}, "spec": body}
    )


def _violations(job: DistillationJob, settings: Settings, labels: dict[str, str] | None = None) -> list[str]:
    scoped, policy = resolve(settings, job.metadata.namespace or "", labels or {})
    return [v.field for v in job_violations(job, policy, artifact_root(job, scoped))]


def test_scopes_are_parsed_and_a_bad_entry_is_refused() -> None:
    settings = from_mapping(BASE)
    a, b = settings.storage_scopes
    assert (a.namespace, a.root, a.secret) == ("team-a", "s3://teams/a/", "s3-team-a")
    assert (b.label, b.root, b.service_account) == (
        ("kubedistill.io/team", "b"),
        "s3://teams/b/",
        "team-b-s3",
    )
    assert settings.uses_namespace_labels and not settings.allow_default_scope
    with pytest.raises(ValueError, match="one label"):
        from_mapping({"KUBEDISTILL_STORAGE_SCOPES": '[{"bucket": "x"}]'})
    with pytest.raises(ValueError, match="boolean"):
        from_mapping({"KUBEDISTILL_ALLOW_DEFAULT_SCOPE": "perhaps"})


def test_a_job_inside_its_scope_passes_and_each_escape_names_its_field() -> None:
    settings = from_mapping(BASE)
    assert _violations(_job(), settings) == []
    assert _violations(_job(student={"model": "s3://models-cache/qwen3/"}), settings) == []
    assert _violations(_job(dataset={"uri": "s3://teams/b/prompts.jsonl"}), settings) == ["spec.dataset.uri"]
    # The prefix is a directory: "a-other" is not under "a/".
    assert _violations(_job(dataset={"uri": "s3://teams/a-other/p.jsonl"}), settings) == ["spec.dataset.uri"]
    assert _violations(_job(dataset={"uri": "file:///etc/passwd"}), settings) == ["spec.dataset.uri"]
    assert _violations(_job(dataset={"uri": "rows.jsonl"}), settings) == ["spec.dataset.uri"]
    assert _violations(_job(student={"model": "s3://teams/b/student/"}), settings) == ["spec.student.model"]
    assert _violations(_job(student={"model": "/models/x"}), settings) == ["spec.student.model"]
    assert _violations(_job(storage={"bucket": "other"}), settings) == ["spec.storage.bucket"]
    assert _violations(_job(storage={"prefix": "b"}), settings) == ["spec.storage.prefix"]
    assert _violations(_job(storage={"prefix": "a/x"}), settings) == []
    # Writing into the shared read-only prefix is refused.
    assert _violations(_job(storage={"bucket": "models-cache", "prefix": ""}), settings) == [
        "spec.storage.bucket"
    ]
    assert _violations(_job(storage={"endpoint": "http://evil.example:9000"}), settings) == [
        "spec.storage.endpoint"
    ]
    bad_image = {"train": {"image": "evil.example/trainer:1"}, "export": {"image": "ghcr.io/kubedistill/x:1"}}
    assert _violations(_job(resources=bad_image), settings) == ["spec.resources.train.image"]


def test_label_scope_default_scope_and_no_scope() -> None:
    settings = from_mapping(BASE)
    job_b = _job("team-b2", dataset={"uri": "s3://teams/b/p.jsonl"})
    assert _violations(job_b, settings, {"kubedistill.io/team": "b"}) == []
    assert _violations(job_b, settings) == ["metadata.namespace"]
    allowed = from_mapping({**BASE, "KUBEDISTILL_ALLOW_DEFAULT_SCOPE": "true"})
    assert _violations(_job("ml", dataset={"uri": "s3://shared/kubedistill/ml/p.jsonl"}), allowed) == []
    assert _violations(_job("ml", dataset={"uri": "s3://shared/kubedistill/ml2/p.jsonl"}), allowed) == [
        "spec.dataset.uri"
    ]


def test_without_scopes_only_files_and_images_are_checked() -> None:
    single = Settings(storage_bucket="b")
    assert _violations(_job("any", dataset={"uri": "s3://anywhere/p.jsonl"}), single) == []
    assert _violations(_job("any", dataset={"uri": "file:///p.jsonl"}), single) == ["spec.dataset.uri"]
    # A file:// artifact root is a single-node cluster whose pods share one filesystem.
    assert (
        _violations(_job("any", dataset={"uri": "file:///p.jsonl"}), Settings(artifact_root="file:///a"))
        == []
    )


def test_stage_pods_get_their_scope_secret_and_service_account() -> None:
    settings = from_mapping({**BASE, "KUBEDISTILL_TRAINER_IMAGE": "ghcr.io/kubedistill/trainer:1"})
    for namespace, labels, secret, account in (
        ("team-a", {}, "s3-team-a", None),
        ("team-b2", {"kubedistill.io/team": "b"}, "s3-team-b", "team-b-s3"),
    ):
        scoped, _ = resolve(settings, namespace, labels)
        job = _job(namespace, dataset={"prompts": ["hi"]})
        (manifest,) = build_stage_manifests(job, Stage.TRAIN, 1, scoped)
        pod = manifest["spec"]["template"]["spec"]
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e
        }
        assert refs == {secret}
        assert pod.get("serviceAccountName") == account


def test_alias_targets_are_walked_including_optional_ones() -> None:
    settings = from_mapping(BASE)
    _, policy = resolve(settings, "team-a", {})
    spec = ModelAliasSpec(target=AliasTarget(gguf_uri="s3://teams/b/m.gguf", base_model="qwen3-0.6b"))
    assert [v.field for v in alias_violations(spec, policy)] == ["spec.target.ggufURI"]
    canary = CanaryTarget(adapter_uri="s3://teams/a/adapter/", base_model="s3://teams/b/base/", weight=20)
    fallback = FallbackTarget(gguf_uri="s3://teams/b/teacher.gguf")
    full = ModelAliasSpec(
        target=spec.target, canary=canary, fallback=fallback, server=ServerSpec(image="docker.io/evil/llama")
    )
    assert [(f, a) for f, _, a in alias_uris(full)] == [
        ("spec.target.ggufURI", Access.READ),
        ("spec.target.baseModel", Access.MODEL),
        ("spec.canary.adapterURI", Access.READ),
        ("spec.canary.baseModel", Access.MODEL),
        ("spec.fallback.ggufURI", Access.READ),
    ]
    # The model server image is an override like a stage's: it runs beside the fetch credentials.
    assert [v.field for v in alias_violations(full, policy)] == [
        "spec.target.ggufURI",
        "spec.canary.baseModel",
        "spec.fallback.ggufURI",
        "spec.server.image",
    ]
