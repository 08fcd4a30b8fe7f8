"""What stage attempts reported: a failed attempt's message in the pod's own words, and the metrics and
artifacts of finished stages merged into the job's status."""

from __future__ import annotations

from kubedistill.api.models import Artifacts, Metrics
from kubedistill.domain.observation import BENIGN_WAITING, MAX_MESSAGE, ChildJob


def failure_message(child: ChildJob) -> str:
    """The pod's own words first: its StageResult, its termination message/log tail, then the Job's."""
    if child.result is not None and not child.result.ok:
        text = (
            f"{child.result.reason}: {child.result.message}" if child.result.message else child.result.reason
        )
    elif child.pod is not None and child.pod.termination_message:
        text = child.pod.termination_message.strip()
    elif (
        child.pod is not None and child.pod.waiting_reason and child.pod.waiting_reason not in BENIGN_WAITING
    ):
        text = f"{child.pod.waiting_reason}: {child.pod.waiting_message or ''}".strip()
    elif child.pod is not None and child.pod.exit_code is not None:
        text = f"exit code {child.pod.exit_code}"
    else:
        text = child.failure_reason or "the stage's Job failed"
    return text[-MAX_MESSAGE:] if len(text) > MAX_MESSAGE else text


def merge_metrics(base: Metrics | None, update: Metrics) -> Metrics:
    data = (base or Metrics()).model_dump()
    data.update({k: v for k, v in update.model_dump().items() if v is not None})
    return Metrics.model_validate(data)


def merge_artifacts(base: Artifacts | None, update: Artifacts) -> Artifacts:
    data = (base or Artifacts()).model_dump()
    for key, value in update.model_dump().items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Artifacts.model_validate(data)
