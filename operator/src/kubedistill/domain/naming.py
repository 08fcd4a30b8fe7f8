"""Deterministic names and labels of a DistillationJob's children.

A retry or an operator restart must find the Job it created before instead of creating a twin, so
every child name is a pure function of (job, stage, attempt) and fits a DNS-1123 label (63 chars).
"""

from __future__ import annotations

import hashlib

from kubedistill.api.models import GROUP, Stage

MAX_NAME = 63
LABEL_JOB = f"{GROUP}/job"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubedistill"
_HASH_LEN = 8


def fit(name: str, limit: int = MAX_NAME) -> str:
    """`name` if it fits, else a prefix plus a hash of the whole name, so distinct names stay distinct."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LEN]
    head = name[: limit - _HASH_LEN - 1].rstrip("-.")
    return f"{head}-{digest}"


def child_job_name(job: str, stage: Stage, attempt: int) -> str:
    """`<job>-<stage>-<attempt>`, shortened with a hash suffix when the job name is long."""
    return fit(f"{job}-{stage.value}-{attempt}")


def invocation_configmap_name(job: str, stage: Stage, attempt: int) -> str:
    return fit(f"{job}-{stage.value}-{attempt}-inv")


def dataset_volume_name() -> str:
    return "dataset"


def label_value(value: str) -> str:
    """A label value (≤ 63 chars); long job names keep a hash so the selector stays exact."""
    return fit(value)


def child_labels(job: str, stage: Stage, attempt: int) -> dict[str, str]:
    return {
        LABEL_JOB: label_value(job),
        LABEL_STAGE: stage.value,
        LABEL_ATTEMPT: str(attempt),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def child_selector(job: str) -> str:
    return f"{LABEL_JOB}={label_value(job)}"


def artifact_base(root: str, namespace: str, job: str, uid: str) -> str:
    """`<root>/<ns>/<job>/<uid>`: the uid keeps a recreated job of the same name from reading old artifacts."""
    return f"{root.rstrip('/')}/{namespace}/{job}/{uid}"
