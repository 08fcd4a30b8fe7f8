from __future__ import annotations

import json
from typing import Any

import pytest

from kubedistill.api.models import DistillationJob, Stage
from kubedistill.api.stage import StageInvocation
from kubedistill.builders import artifact_root, build_invocation, build_stage_manifests, referenced_secrets
from kubedistill.domain.naming import LABEL_ATTEMPT, LABEL_JOB, LABEL_STAGE
from kubedistill.settings import Settings, from_mapping

SETTINGS = Settings(
    storage_bucket="artifacts", storage_secret="s3-creds", storage_endpoint="http://minio:9000"
)


def make_job(**spec: Any) -> DistillationJob:
    body: dict[str, Any] = {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": "bot", "namespace": "team", "uid": "uid-1", "generation": 1},
        "spec": {
            "teacher": {"model": "openai/gpt-4o", "apiKeySecretRef": {"name": "openai", "key": "api-key"}},
            "student": {"model": "qwen3-0.6b"},
            "dataset": {"prompts": ["hi", "there"]},
            **spec,
        },
    }
    return DistillationJob.model_validate(body)


def job_of(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    assert manifests[-1]["kind"] == "Job"
    return manifests[-1]


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_map(manifest: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest)["env"]}


def test_job_identity_owner_and_labels() -> None:
    job = job_of(build_stage_manifests(make_job(), Stage.CURATE, 2, SETTINGS))
    meta = job["metadata"]
    assert meta["name"] == "bot-curate-2" and meta["namespace"] == "team"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kubedistill.io/v1alpha1",
            "kind": "DistillationJob",
            "name": "bot",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    for labels in (meta["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[LABEL_JOB] == "bot" and labels[LABEL_STAGE] == "curate" and labels[LABEL_ATTEMPT] == "2"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert container(job)["args"] == ["curate"] and "command" not in container(job)
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_invocation_in_env_round_trips() -> None:
    job = job_of(build_stage_manifests(make_job(), Stage.GENERATE, 1, SETTINGS))
    inv = StageInvocation.model_validate_json(env_map(job)["KUBEDISTILL_JOB"])
    assert inv.stage == Stage.GENERATE and inv.attempt == 1
    assert inv.artifact_base == "s3://artifacts/kubedistill/team/bot/uid-1"
    assert inv.job.uid == "uid-1" and inv.spec.teacher.model == "openai/gpt-4o"


def test_large_invocation_goes_to_an_owned_configmap() -> None:
    big = make_job(dataset={"prompts": ["p" * 1000] * 64})
    manifests = build_stage_manifests(big, Stage.GENERATE, 1, SETTINGS)
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Job"]
    cm, job = manifests
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    inv = StageInvocation.model_validate_json(cm["data"]["job.json"])
    assert len(inv.spec.dataset.prompts or []) == 64
    env = env_map(job)
    assert "KUBEDISTILL_JOB" not in env and env["KUBEDISTILL_JOB_FILE"] == "/etc/kubedistill/job.json"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["invocation"]["configMap"]["name"] == cm["metadata"]["name"]


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (Stage.GENERATE, {"KUBEDISTILL_TEACHER_API_KEY": ("openai", "api-key")}),
        (
            Stage.CURATE,
            {
                "KUBEDISTILL_TEACHER_API_KEY": ("openai", "api-key"),
                "KUBEDISTILL_JUDGE_API_KEY": ("judge", "k"),
            },
        ),
        (Stage.TRAIN, {}),
        (Stage.EXPORT, {}),
    ],
)
def test_secrets_only_through_secret_key_refs(stage: Stage, expected: dict[str, tuple[str, str]]) -> None:
    dj = make_job(curation={"judge": {"llm": {"apiKeySecretRef": {"name": "judge", "key": "k"}}}})
    job = job_of(build_stage_manifests(dj, stage, 1, SETTINGS))
    env = env_map(job)
    keys = {
        name: (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        for name, ref in env.items()
        if isinstance(ref, dict)
    }
    assert keys == {
        **expected,
        "AWS_ACCESS_KEY_ID": ("s3-creds", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("s3-creds", "AWS_SECRET_ACCESS_KEY"),
    }
    assert env["KUBEDISTILL_S3_ENDPOINT"] == "http://minio:9000"
    # No literal value anywhere in the manifest mentions a secret key variable.
    assert all(not isinstance(v, str) or "API_KEY" not in v for v in env.values())


def test_referenced_secrets_match_the_env() -> None:
    dj = make_job()
    assert referenced_secrets(dj, Stage.GENERATE, SETTINGS) == [("openai", "api-key"), ("s3-creds", None)]
    assert referenced_secrets(dj, Stage.TRAIN, SETTINGS) == [("s3-creds", None)]


def test_pod_is_hardened() -> None:
    job = job_of(build_stage_manifests(make_job(), Stage.TRAIN, 1, SETTINGS))
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_gpu_defaults_apply_to_train_only() -> None:
    train = job_of(build_stage_manifests(make_job(), Stage.TRAIN, 1, SETTINGS))
    assert container(train)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert train["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    generate = job_of(build_stage_manifests(make_job(), Stage.GENERATE, 1, SETTINGS))
    assert "nvidia.com/gpu" not in container(generate)["resources"].get("limits", {})
    assert "tolerations" not in generate["spec"]["template"]["spec"]


def test_cpu_cluster_setting_turns_gpus_off() -> None:
    settings = from_mapping({"KUBEDISTILL_DEFAULT_TRAIN_GPUS": "0", "KUBEDISTILL_STORAGE_BUCKET": "b"})
    train = job_of(build_stage_manifests(make_job(), Stage.TRAIN, 1, settings))
    assert "nvidia.com/gpu" not in container(train)["resources"].get("limits", {})
    assert "tolerations" not in train["spec"]["template"]["spec"]


def test_spec_overrides_win() -> None:
    dj = make_job(
        resources={
            "train": {
                "gpus": 2,
                "nodeSelector": {"gpu": "a100"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
                "priorityClassName": "high",
                "image": "registry.local/trainer:dev",
                "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "64Gi"}},
            }
        }
    )
    train = job_of(build_stage_manifests(dj, Stage.TRAIN, 1, SETTINGS))
    pod = train["spec"]["template"]["spec"]
    assert container(train)["resources"] == {
        "requests": {"cpu": "4"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    assert pod["nodeSelector"] == {"gpu": "a100"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml"}]
    assert pod["priorityClassName"] == "high"
    assert container(train)["image"] == "registry.local/trainer:dev"


def test_dataset_configmap_is_mounted_as_a_file() -> None:
    dj = make_job(dataset={"configMapRef": {"name": "prompts", "key": "rows.jsonl"}})
    job = job_of(build_stage_manifests(dj, Stage.GENERATE, 1, SETTINGS))
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dataset"]["configMap"] == {
        "name": "prompts",
        "items": [{"key": "rows.jsonl", "path": "dataset.jsonl"}],
    }
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == "dataset")
    assert env_map(job)["KUBEDISTILL_DATASET_FILE"] == f"{mount['mountPath']}/dataset.jsonl"


def test_suspend_and_deadline() -> None:
    job = job_of(
        build_stage_manifests(make_job(suspend=True), Stage.EXPORT, 1, SETTINGS, active_deadline_seconds=90)
    )
    assert job["spec"]["suspend"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 90
    plain = job_of(build_stage_manifests(make_job(), Stage.EXPORT, 1, SETTINGS))
    assert plain["spec"]["suspend"] is False and "activeDeadlineSeconds" not in plain["spec"]


def test_artifact_root_choices() -> None:
    assert artifact_root(make_job(storage={"bucket": "mine", "prefix": ""}), SETTINGS) == "s3://mine"
    assert artifact_root(make_job(), Settings(artifact_root="file:///data")) == "file:///data"
    with pytest.raises(ValueError, match="no artifact storage"):
        artifact_root(make_job(), Settings())


def test_a_file_artifact_root_is_mounted_from_the_node_where_the_root_filesystem_is_read_only() -> None:
    job = job_of(build_stage_manifests(make_job(), Stage.TRAIN, 1, Settings(artifact_root="file:///data/kd")))
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["artifacts"]["hostPath"] == {"path": "/data/kd", "type": "DirectoryOrCreate"}
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == "artifacts")
    assert mount == {"name": "artifacts", "mountPath": "/data/kd"}
    on_s3 = job_of(build_stage_manifests(make_job(), Stage.TRAIN, 1, SETTINGS))
    assert "artifacts" not in {v["name"] for v in on_s3["spec"]["template"]["spec"]["volumes"]}


def test_stage_env_setting_is_passed_through() -> None:
    settings = Settings(storage_bucket="b", stage_env={"HTTPS_PROXY": "http://proxy:3128"})
    job = job_of(build_stage_manifests(make_job(), Stage.GENERATE, 1, settings))
    assert env_map(job)["HTTPS_PROXY"] == "http://proxy:3128"
    json.dumps(job)  # manifests are plain JSON


def test_settings_reject_bad_values_naming_the_key() -> None:
    with pytest.raises(ValueError, match="KUBEDISTILL_DEFAULT_TRAIN_GPUS"):
        from_mapping({"KUBEDISTILL_DEFAULT_TRAIN_GPUS": "one"})
    with pytest.raises(ValueError, match="KUBEDISTILL_STAGE_ENV is not valid JSON"):
        from_mapping({"KUBEDISTILL_STAGE_ENV": "{"})


def test_settings_stage_resources_and_backoff() -> None:
    settings = from_mapping(
        {
            "KUBEDISTILL_STORAGE_BUCKET": "b",
            "KUBEDISTILL_EXPORT_RESOURCES": '{"requests": {"cpu": "1"}}',
            "KUBEDISTILL_RETRY_BACKOFF_BASE_S": "2",
            "KUBEDISTILL_RETRY_BACKOFF_MAX_S": "5",
        }
    )
    export = job_of(build_stage_manifests(make_job(), Stage.EXPORT, 1, settings))
    assert container(export)["resources"] == {"requests": {"cpu": "1"}}
    assert [settings.backoff_s(n) for n in (0, 1, 2, 3, 4)] == [0.0, 2.0, 4.0, 5.0, 5.0]


def test_a_traffic_dataset_reads_a_window_fixed_at_the_jobs_creation() -> None:
    job = make_job(dataset={"fromTraffic": {"alias": "smart", "since": "7d"}})
    job.metadata.model_extra["creationTimestamp"] = "2026-12-03T10:00:00Z"  # type: ignore[index]
    traffic = build_invocation(job, Stage.GENERATE, 1, SETTINGS).spec.dataset.from_traffic
    assert traffic is not None
    # The end is exclusive and the timestamp has whole seconds: requests recorded within the creation's
    # second are in the window.
    assert (traffic.uri, traffic.until) == (
        "s3://artifacts/kubedistill/recordings/team/smart",
        "2026-12-03T10:00:01Z",
    )
    assert (
        build_invocation(job, Stage.ESTIMATE, 2, SETTINGS).spec
        == build_invocation(job, Stage.GENERATE, 1, SETTINGS).spec
    )
