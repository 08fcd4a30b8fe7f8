from __future__ import annotations

import re

import pytest

from kubedistill.api.models import STAGES, Stage
from kubedistill.domain.naming import (
    LABEL_JOB,
    artifact_base,
    child_job_name,
    child_labels,
    child_selector,
    invocation_configmap_name,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_short_names_are_readable() -> None:
    assert child_job_name("support-bot", Stage.TRAIN, 2) == "support-bot-train-2"


@pytest.mark.parametrize("length", [40, 52, 53, 60, 63, 100, 253])
def test_long_names_fit_and_stay_distinct(length: int) -> None:
    job = "a" * (length - 1) + "b"
    names = {child_job_name(job, stage, attempt) for stage in STAGES for attempt in (1, 2, 11)}
    assert len(names) == len(STAGES) * 3
    for name in names:
        assert len(name) <= 63
        assert DNS_LABEL.match(name), name


def test_names_are_deterministic() -> None:
    job = "x" * 80
    assert child_job_name(job, Stage.EXPORT, 3) == child_job_name(job, Stage.EXPORT, 3)
    assert child_job_name(job, Stage.EXPORT, 3) != child_job_name("x" * 79 + "y", Stage.EXPORT, 3)
    assert len(invocation_configmap_name(job, Stage.EXPORT, 3)) <= 63


def test_labels_fit_and_select_their_job() -> None:
    long_job = "j" * 200
    labels = child_labels(long_job, Stage.CURATE, 1)
    assert all(len(v) <= 63 for v in labels.values())
    assert child_selector(long_job) == f"{LABEL_JOB}={labels[LABEL_JOB]}"
    assert child_selector("other") != child_selector(long_job)


def test_artifact_base_includes_uid() -> None:
    assert artifact_base("s3://b/p/", "ns", "job", "u-1") == "s3://b/p/ns/job/u-1"
