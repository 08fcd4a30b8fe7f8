"""The operator's Prometheus metrics: what the recording calls do to the exported series."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from kubedistill.api.models import Metrics, Phase
from kubedistill.metrics import OperatorMetrics, start_metrics_server


@pytest.fixture
def metrics() -> OperatorMetrics:
    return OperatorMetrics(CollectorRegistry())


def value(m: OperatorMetrics, metric: str, /, **labels: str) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def test_jobs_by_phase_counts_each_job_once(metrics: OperatorMetrics) -> None:
    metrics.observe_job_phase("a", "j1", Phase.PENDING)
    metrics.observe_job_phase("a", "j2", Phase.PENDING)
    metrics.observe_job_phase("a", "j1", Phase.GENERATING)
    metrics.observe_job_phase("a", "j1", Phase.GENERATING)  # a repeated observation changes nothing
    assert value(metrics, "kubedistill_jobs", namespace="a", phase="Pending") == 1
    assert value(metrics, "kubedistill_jobs", namespace="a", phase="Generating") == 1
    metrics.forget_job("a", "j1")
    metrics.forget_job("a", "unknown")
    assert value(metrics, "kubedistill_jobs", namespace="a", phase="Generating") == 0
    assert metrics.phase_counts() == {"Pending": 1}


def test_pending_since_tracks_only_jobs_still_pending(metrics: OperatorMetrics) -> None:
    metrics.observe_job_phase("a", "old", Phase.PENDING, since=1000.0)
    metrics.observe_job_phase("a", "old", Phase.PENDING, since=2000.0)  # still the same Pending spell
    metrics.observe_job_phase("a", "moving", Phase.PENDING, since=1500.0)
    metrics.observe_job_phase("a", "moving", Phase.GENERATING)
    metrics.observe_job_phase("a", "gone", Phase.PENDING, since=1700.0)
    metrics.forget_job("a", "gone")
    assert (
        value(metrics, "kubedistill_job_pending_since_timestamp_seconds", namespace="a", name="old") == 1000.0
    )
    assert (
        value(metrics, "kubedistill_job_pending_since_timestamp_seconds", namespace="a", name="moving")
        is None
    )
    assert (
        value(metrics, "kubedistill_job_pending_since_timestamp_seconds", namespace="a", name="gone") is None
    )


def test_a_job_without_phase_counts_as_pending(metrics: OperatorMetrics) -> None:
    metrics.observe_job_phase("a", "new", None)
    assert value(metrics, "kubedistill_jobs", namespace="a", phase="Pending") == 1


def test_stage_attempts_failures_and_durations(metrics: OperatorMetrics) -> None:
    metrics.record_stage_attempt("generate")
    metrics.record_stage_attempt("generate")
    metrics.record_stage_failure("generate", "TeacherUnavailable")
    metrics.record_stage_failure("train", "")
    metrics.record_stage_finished("generate", succeeded=True, duration_seconds=42.0)
    metrics.record_stage_finished("train", succeeded=False, duration_seconds=None)
    assert value(metrics, "kubedistill_stage_attempts_total", stage="generate") == 2
    assert (
        value(metrics, "kubedistill_stage_failures_total", stage="generate", reason="TeacherUnavailable") == 1
    )
    assert value(metrics, "kubedistill_stage_failures_total", stage="train", reason="Unknown") == 1
    assert (
        value(metrics, "kubedistill_stage_duration_seconds_count", stage="generate", outcome="succeeded") == 1
    )
    assert (
        value(metrics, "kubedistill_stage_duration_seconds_sum", stage="generate", outcome="succeeded")
        == 42.0
    )
    assert (
        value(
            metrics,
            "kubedistill_stage_duration_seconds_bucket",
            stage="generate",
            outcome="succeeded",
            le="30.0",
        )
        == 0
    )
    assert value(metrics, "kubedistill_stage_duration_seconds_count", stage="train", outcome="failed") is None


def test_teacher_usage_counts_only_what_a_status_update_adds(metrics: OperatorMetrics) -> None:
    teacher = "openai/gpt-4o-mini"
    first = Metrics(teacher_input_tokens=100, teacher_output_tokens=40, teacher_cost_total=0.5)
    more = Metrics(teacher_input_tokens=150, teacher_output_tokens=40, teacher_cost_total=0.75)
    metrics.record_teacher_delta(teacher, None, first)
    metrics.record_teacher_delta(teacher, first, first)  # a status rewrite with the same figures
    metrics.record_teacher_delta(teacher, first, more)
    metrics.record_teacher_delta(teacher, more, None)
    assert value(metrics, "kubedistill_teacher_tokens_total", teacher=teacher, direction="input") == 150
    assert value(metrics, "kubedistill_teacher_tokens_total", teacher=teacher, direction="output") == 40
    assert value(metrics, "kubedistill_teacher_cost_usd_total", teacher=teacher) == 0.75


def test_reconcile_errors_and_time_to_first_job(metrics: OperatorMetrics) -> None:
    metrics.record_reconcile_error("reconcile", KeyError("x"))
    metrics.observe_time_to_first_job(3.5)
    metrics.observe_time_to_first_job(-1)  # clock skew between nodes must not poison the histogram
    assert value(metrics, "kubedistill_reconcile_errors_total", handler="reconcile", error="KeyError") == 1
    assert value(metrics, "kubedistill_time_to_first_job_seconds_count") == 1
    assert value(metrics, "kubedistill_time_to_first_job_seconds_sum") == 3.5


def test_the_http_server_serves_the_registry(metrics: OperatorMetrics) -> None:
    metrics.record_stage_attempt("export")
    server, thread = start_metrics_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            body = response.read().decode()
        assert 'kubedistill_stage_attempts_total{stage="export"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_failure_reason_prefers_the_stages_own_reason() -> None:
    from kubedistill.api.models import Stage
    from kubedistill.api.stage import StageResult
    from kubedistill.domain.observation import ChildJob
    from kubedistill.metrics import failure_reason

    def child(attempt: int, **kw: object) -> ChildJob:
        return ChildJob(name=f"j-train-{attempt}", stage=Stage.TRAIN, attempt=attempt, **kw)  # type: ignore[arg-type]

    oom = StageResult(stage=Stage.TRAIN, ok=False, reason="OutOfMemory", message="CUDA out of memory")
    assert failure_reason([], Stage.TRAIN) == "StageFailed"
    assert failure_reason([child(1, failed=True, result=oom)], Stage.TRAIN) == "OutOfMemory"
    # The latest failed attempt counts; a Job killed by its deadline reports no result of its own.
    later = [child(1, failed=True, result=oom), child(2, failed=True, failure_reason="DeadlineExceeded")]
    assert failure_reason(later, Stage.TRAIN) == "DeadlineExceeded"
    assert failure_reason([child(1, failed=True)], Stage.TRAIN) == "StageFailed"
    assert failure_reason([child(1, failed=True, result=oom)], Stage.EXPORT) == "StageFailed"
