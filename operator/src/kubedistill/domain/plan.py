"""What a job does, whoever runs it: which stages run, which are skipped and why, and when a failed
stage is tried again. The operator's phase machine and local mode both ask here, so a job behaves the
same on a cluster and on a laptop.
"""

from __future__ import annotations

from kubedistill.api.models import STAGES, DistillationJobSpec, Stage
from kubedistill.settings import Settings


def skipped_stages(spec: DistillationJobSpec) -> dict[Stage, str]:
    """The stages this spec leaves out, each with the reason shown in its status."""
    return {} if spec.evaluation.enabled else {Stage.EVALUATE: "evaluation.enabled is false"}


def stages_to_run(spec: DistillationJobSpec) -> list[Stage]:
    skipped = skipped_stages(spec)
    return [stage for stage in STAGES if stage not in skipped]


def retry_delay(failed_attempts: int, spec: DistillationJobSpec, settings: Settings) -> float | None:
    """Seconds to wait before the next attempt of a stage that failed `failed_attempts` times, or None
    when `spec.retries` are spent and the job fails."""
    if failed_attempts > spec.retries:
        return None
    return settings.backoff_s(failed_attempts)
