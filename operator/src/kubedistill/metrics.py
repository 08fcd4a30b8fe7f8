"""Prometheus metrics of the operator, and the small recording calls its handlers make.

Handlers call the ``record_*``/``observe_*`` functions at the moments the operator already detects
(a stage Job created, a stage seen finished, a handler raising); nothing here talks to the API
server. Counters are only ever fed by transitions the operator persists in the job's status, so an
operator restart does not count a finished stage twice.

The operator serves these on ``--metrics-port`` (the chart's ``metrics.port``) with
`start_metrics_server`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubedistill.api.models import Metrics, Phase, Stage
from kubedistill.domain.observation import ChildJob

NAMESPACE = "kubedistill"
# Stages run from seconds (tests, tiny jobs) to a day (big generations, long training runs).
STAGE_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
# From the DistillationJob's creation to its first stage Job: estimation plus the operator's latency.
FIRST_JOB_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800)


@dataclass
class OperatorMetrics:
    """Every metric the operator exports, registered in one registry (the process default unless given)."""

    registry: CollectorRegistry = field(default_factory=lambda: REGISTRY)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Gauge(
            "jobs",
            "DistillationJobs this operator watches, by namespace and phase.",
            ["namespace", "phase"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.pending_since = Gauge(
            "job_pending_since_timestamp_seconds",
            "When each DistillationJob now Pending became Pending (Unix time); no series once it moves on.",
            ["namespace", "name"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.stage_duration = Histogram(
            "stage_duration_seconds",
            "Wall time of finished stages, first attempt start to end.",
            ["stage", "outcome"],
            namespace=NAMESPACE,
            buckets=STAGE_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_attempts = Counter(
            "stage_attempts",
            "Stage Jobs created (every attempt, retries included).",
            ["stage"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.stage_failures = Counter(
            "stage_failures",
            "Failed stage attempts, by the reason the stage or Kubernetes gave.",
            ["stage", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.teacher_cost = Counter(
            "teacher_cost_usd",
            "Dollars spent on teacher requests, as reported by finished stages.",
            ["teacher"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.teacher_tokens = Counter(
            "teacher_tokens",
            "Teacher tokens billed, as reported by finished stages.",
            ["teacher", "direction"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "reconcile_errors",
            "Handler runs that raised, by handler and exception type.",
            ["handler", "error"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.time_to_first_job = Histogram(
            "time_to_first_job_seconds",
            "From a DistillationJob's creation to its first stage Job.",
            namespace=NAMESPACE,
            buckets=FIRST_JOB_BUCKETS,
            registry=r,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # -- jobs by phase -------------------------------------------------------------------------------

    def observe_job_phase(
        self, namespace: str, name: str, phase: Phase | str | None, *, since: float | None = None
    ) -> None:
        """Remember the job's current phase; the gauge always equals the count of jobs per phase.

        `since` (Unix time) is when the job entered this phase if known, e.g. its creation for a new
        job: after an operator restart, "Pending since" must not restart from now.
        """
        value = str(phase or Phase.PENDING)
        with self._lock:
            previous = self._phases.get((namespace, name))
            if previous == value:
                return
            if previous is not None:
                self.jobs.labels(namespace, previous).dec()
            self._phases[(namespace, name)] = value
            self.jobs.labels(namespace, value).inc()
            if value == Phase.PENDING:
                self.pending_since.labels(namespace, name).set(since if since is not None else time.time())
            elif previous == Phase.PENDING:
                self.pending_since.remove(namespace, name)

    def forget_job(self, namespace: str, name: str) -> None:
        with self._lock:
            previous = self._phases.pop((namespace, name), None)
            if previous is not None:
                self.jobs.labels(namespace, previous).dec()
            if previous == Phase.PENDING:
                self.pending_since.remove(namespace, name)

    # -- stages --------------------------------------------------------------------------------------

    def record_stage_attempt(self, stage: str) -> None:
        self.stage_attempts.labels(stage).inc()

    def record_stage_failure(self, stage: str, reason: str) -> None:
        self.stage_failures.labels(stage, reason or "Unknown").inc()

    def record_stage_finished(self, stage: str, *, succeeded: bool, duration_seconds: float | None) -> None:
        """A stage reached Succeeded or Failed for good: how long it took, first attempt to end."""
        if duration_seconds is not None and duration_seconds >= 0:
            self.stage_duration.labels(stage, "succeeded" if succeeded else "failed").observe(
                duration_seconds
            )

    def record_teacher_delta(self, teacher: str, before: Metrics | None, after: Metrics | None) -> None:
        """Count the teacher usage a status update adds to a job's cumulative `status.metrics`.

        `before` is the status the operator read (persisted), `after` the one it writes: a restarted
        operator starts from the persisted figures, so nothing is counted twice.
        """
        if after is None:
            return
        old = before or Metrics()
        pairs = (
            ("input", old.teacher_input_tokens, after.teacher_input_tokens),
            ("output", old.teacher_output_tokens, after.teacher_output_tokens),
        )
        for direction, was, now in pairs:
            if now is not None and now > (was or 0):
                self.teacher_tokens.labels(teacher, direction).inc(now - (was or 0))
        was_cost, now_cost = old.teacher_cost_total or 0.0, after.teacher_cost_total
        if now_cost is not None and now_cost > was_cost:
            self.teacher_cost.labels(teacher).inc(now_cost - was_cost)

    def observe_time_to_first_job(self, seconds: float) -> None:
        if seconds >= 0:
            self.time_to_first_job.observe(seconds)

    def record_reconcile_error(self, handler: str, error: BaseException) -> None:
        self.reconcile_errors.labels(handler, type(error).__name__).inc()

    def phase_counts(self) -> Mapping[str, int]:
        """Jobs per phase across namespaces (for logs and tests)."""
        counts: dict[str, int] = {}
        with self._lock:
            for phase in self._phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        return counts


def failure_reason(children: Sequence[ChildJob], stage: Stage) -> str:
    """Why the latest failed attempt of a stage failed: the stage's own CamelCase reason, else the Job
    controller's (BackoffLimitExceeded, DeadlineExceeded), else StageFailed. All bounded sets: labels."""
    failed = [c for c in children if c.stage == stage and c.failed]
    if not failed:
        return "StageFailed"
    latest = max(failed, key=lambda c: c.attempt)
    if latest.result is not None and not latest.result.ok and latest.result.reason:
        return latest.result.reason
    return latest.failure_reason or "StageFailed"


_default: OperatorMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> OperatorMetrics:
    """The process-wide instance the handlers record into (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = OperatorMetrics()
        return _default


def start_metrics_server(
    port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on a daemon thread; port 0 picks a free port (``server.server_port``)."""
    return start_http_server(port, addr=addr, registry=registry or REGISTRY)
