"""The local kubelet's pure parts: scheduling, environment, argv, status."""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from kubedistill_testing.kubelet import (
    ConfigError,
    ContainerState,
    configmap_volume_files,
    container_env,
    exit_code,
    expand_vars,
    insufficient,
    pod_phase,
    pod_requests,
    remap_path,
    remap_paths,
    resolve_argv,
    selector_matches,
    termination_message,
    unschedulable_message,
)

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"serviceAccountName": "stage", "nodeName": "n1", "containers": []},
    "status": {},
}
DATA = {("secret", "ns", "s"): {"token": "t0k"}, ("configmap", "ns", "c"): {"model": "tiny", "temp": "0.2"}}


def lookup(kind: str, namespace: str, name: str) -> dict[str, str] | None:
    return DATA.get((kind, namespace, name))


def gpu_pod(gpus: str) -> dict[str, Any]:
    resources = {"requests": {"nvidia.com/gpu": gpus, "cpu": "500m"}}
    return {"spec": {"containers": [{"name": "a", "resources": resources}]}}


def test_requests_sum_containers_and_count_the_pod() -> None:
    pod = {
        "spec": {
            "containers": [
                {"resources": {"requests": {"cpu": "500m"}}},
                {"resources": {"requests": {"cpu": "1"}}},
            ]
        }
    }
    assert pod_requests(pod) == {"pods": 1, "cpu": Decimal("1.5")}


def test_gpu_request_on_a_gpu_less_node_is_insufficient() -> None:
    allocatable = {"cpu": Decimal(8), "nvidia.com/gpu": Decimal(0), "pods": Decimal(110)}
    assert insufficient(pod_requests(gpu_pod("1")), allocatable, {}) == ["nvidia.com/gpu"]
    assert insufficient(pod_requests(gpu_pod("1")), {**allocatable, "nvidia.com/gpu": Decimal(1)}, {}) == []
    used = {"nvidia.com/gpu": Decimal(1)}
    assert insufficient(pod_requests(gpu_pod("1")), {**allocatable, "nvidia.com/gpu": Decimal(1)}, used) == [
        "nvidia.com/gpu"
    ]


def test_unschedulable_message_matches_the_scheduler() -> None:
    assert (
        unschedulable_message(["nvidia.com/gpu"], True)
        == "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    )
    assert unschedulable_message(["cpu", "memory"], True) == (
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory."
    )
    assert "node affinity/selector" in unschedulable_message([], False)


def test_node_selector() -> None:
    pod = {"spec": {"nodeSelector": {"gpu": "a100"}}}
    assert not selector_matches(pod, {"kubernetes.io/os": "linux"})
    assert selector_matches(pod, {"gpu": "a100"})


def test_expand_vars_like_kubernetes() -> None:
    env = {"A": "1"}
    assert expand_vars("x-$(A)-$(B)-$$(A)", env) == "x-1-$(B)-$(A)"


def test_env_resolves_value_from_and_env_from() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "CFG_"}],
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
            {"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "model"}}},
            {
                "name": "MISSING",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
            {"name": "GREETING", "value": "$(NAME) uses $(MODEL)"},
        ],
    }
    env = container_env(POD, container, lookup, {"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "CFG_model": "tiny",
        "CFG_temp": "0.2",
        "NAME": "p",
        "APP": "x",
        "TOKEN": "t0k",
        "MODEL": "tiny",
        "GREETING": "p uses tiny",
    }


def test_missing_secret_is_a_config_error() -> None:
    container = {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}
    with pytest.raises(ConfigError) as caught:
        container_env(POD, container, lookup, {})
    assert caught.value.reason == "CreateContainerConfigError"
    assert caught.value.message == 'secret "absent" not found'


def test_missing_key_is_a_config_error() -> None:
    container = {"env": [{"name": "T", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "absent"}}}]}
    with pytest.raises(ConfigError, match="couldn't find key absent in configmap ns/c"):
        container_env(POD, container, lookup, {})


IMAGES = {
    "ghcr.io/kubedistill/trainer": ["py", "-m", "kubedistill_trainer"],
    "ghcr.io/kubedistill": ["generic"],
}


def test_image_mapping_replaces_the_entrypoint_and_appends_args() -> None:
    container = {"image": "ghcr.io/kubedistill/trainer:0.1.0", "args": ["train", "--shard=$(S)"]}
    assert resolve_argv(container, {"S": "2"}, IMAGES, {}) == [
        "py",
        "-m",
        "kubedistill_trainer",
        "train",
        "--shard=2",
    ]


def test_command_runs_as_given_with_python_meaning_this_interpreter() -> None:
    container = {"image": "anything", "command": ["python", "-m", "x"], "args": ["a"]}
    assert resolve_argv(container, {}, IMAGES, {"python": sys.executable}) == [sys.executable, "-m", "x", "a"]


MOUNTS = {"/tmp": Path("/k/pods/u1/volumes/tmp"), "/tmp/cache/": Path("/k/pods/u1/volumes/cache")}


def test_a_path_under_a_mount_points_at_the_deepest_mounts_local_directory() -> None:
    assert remap_path("/tmp", MOUNTS) == "/k/pods/u1/volumes/tmp"
    assert remap_path("/tmp/out/a.json", MOUNTS) == "/k/pods/u1/volumes/tmp/out/a.json"
    assert remap_path("/tmp/cache", MOUNTS) == "/k/pods/u1/volumes/cache"
    assert remap_path("/tmp/cache/hf", MOUNTS) == "/k/pods/u1/volumes/cache/hf"
    assert remap_path("--output=/tmp/x", MOUNTS) == "--output=/k/pods/u1/volumes/tmp/x"
    assert remap_path("/tmpfoo", MOUNTS) == "/tmpfoo"
    assert remap_path("/var/tmp/x", MOUNTS) == "/var/tmp/x"
    assert remap_path("s3://b/tmp/x", MOUNTS) == "s3://b/tmp/x"
    assert remap_path("train", MOUNTS) == "train"


def test_command_and_args_under_a_mount_are_remapped_after_expansion_but_not_the_images_entrypoint() -> None:
    images = {"img": ["/tmp/entry"]}
    container = {"image": "img", "args": ["$(OUT)/r.json", "--cache=/tmp/cache", "/etc/x"]}
    assert resolve_argv(container, {"OUT": "/tmp/out"}, images, {}, MOUNTS) == [
        "/tmp/entry",
        "/k/pods/u1/volumes/tmp/out/r.json",
        "--cache=/k/pods/u1/volumes/cache",
        "/etc/x",
    ]
    with_command = {"image": "img", "command": ["sh", "/tmp/run.sh"]}
    assert resolve_argv(with_command, {}, images, {}, MOUNTS) == ["sh", "/k/pods/u1/volumes/tmp/run.sh"]


def test_unmapped_image_without_command_cannot_start() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_argv({"image": "docker.io/library/busybox"}, {}, IMAGES, {})
    assert caught.value.reason == "ErrImageNeverPull"


def test_exit_codes_and_termination_messages() -> None:
    assert exit_code(3) == 3
    assert exit_code(-9) == 137
    assert termination_message("done", "log", "File", 1) == "done"
    assert termination_message("", "a\nb", "FallbackToLogsOnError", 1) == "a\nb"
    assert termination_message("", "a\nb", "FallbackToLogsOnError", 0) == ""
    assert termination_message("", "a\nb", "File", 1) == ""


def terminated(name: str, code: int) -> ContainerState:
    return ContainerState(name, "img", state={"terminated": {"exitCode": code}})


def running(name: str) -> ContainerState:
    return ContainerState(name, "img", state={"running": {"startedAt": "t"}})


def test_pod_phase() -> None:
    assert pod_phase([], [ContainerState("a", "img")], "Never") == "Pending"
    assert pod_phase([], [running("a"), terminated("b", 0)], "Never") == "Running"
    assert pod_phase([], [terminated("a", 0), terminated("b", 0)], "Never") == "Succeeded"
    assert pod_phase([], [terminated("a", 0), terminated("b", 2)], "Never") == "Failed"
    assert pod_phase([], [terminated("a", 2)], "OnFailure") == "Running"  # about to restart
    assert pod_phase([terminated("init", 1)], [ContainerState("a", "img")], "Never") == "Failed"


def test_container_status_nulls_the_states_it_left() -> None:
    status = terminated("a", 0).as_status()
    assert status["state"] == {"waiting": None, "running": None, "terminated": {"exitCode": 0}}
    assert status["ready"] is False


def test_configmap_volumes_and_paths_under_their_mount() -> None:
    data = {"dataset.jsonl": '{"prompt": "hi"}\n', "other": "x"}
    source = {"name": "rows", "items": [{"key": "dataset.jsonl", "path": "dataset.jsonl"}]}
    assert configmap_volume_files(source, data) == {"dataset.jsonl": '{"prompt": "hi"}\n'}
    assert configmap_volume_files({"name": "rows"}, data) == data
    with pytest.raises(ConfigError, match="non-existent config key: missing"):
        configmap_volume_files({"name": "rows", "items": [{"key": "missing", "path": "m"}]}, data)
    env = {"FILE": "/var/run/ds/dataset.jsonl", "DIR": "/var/run/ds", "NEAR": "/var/run/dsx", "HOME": "/tmp"}
    assert remap_paths(env, {"/var/run/ds/": Path("/pods/u1/volumes/dataset")}) == {
        "FILE": "/pods/u1/volumes/dataset/dataset.jsonl",
        "DIR": "/pods/u1/volumes/dataset",
        "NEAR": "/var/run/dsx",
        "HOME": "/tmp",
    }
