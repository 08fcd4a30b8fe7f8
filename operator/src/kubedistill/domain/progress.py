"""status.progress: how far the whole pipeline is, from the stages done and the running stage's own report."""

from __future__ import annotations

from kubedistill.api.models import STAGES, Phase, Progress, Stage, StageState, StageStatus
from kubedistill.api.stage import StageProgress
from kubedistill.domain.observation import MAX_MESSAGE

# Share of the whole pipeline each stage stands for in status.progress.percent.
STAGE_WEIGHT: dict[Stage, float] = {
    Stage.ESTIMATE: 2.0,
    Stage.GENERATE: 33.0,
    Stage.CURATE: 15.0,
    Stage.TRAIN: 35.0,
    Stage.EXPORT: 10.0,
    Stage.EVALUATE: 5.0,
}


def overall_progress(
    stages: dict[Stage, StageStatus],
    current: Stage | None,
    phase: Phase | None,
    previous: Progress | None,
    reported: StageProgress | None,
) -> Progress:
    """Done stages count whole; the running one by the fraction it reported (else the last known)."""
    done = sum(
        STAGE_WEIGHT[s] for s in STAGES if stages[s].state in (StageState.SUCCEEDED, StageState.SKIPPED)
    )
    if current is None:
        return Progress(stage=None, percent=100.0 if phase == Phase.SUCCEEDED else done)
    if reported is not None and reported.stage == current:
        return Progress(
            stage=current,
            percent=round(min(100.0, done + STAGE_WEIGHT[current] * reported.fraction), 1),
            detail=reported.detail[:MAX_MESSAGE] or None,
            updated_at=reported.updated_at,
        )
    if previous is not None and previous.stage == current:
        return previous
    return Progress(stage=current, percent=round(done, 1))
