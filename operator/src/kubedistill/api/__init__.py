"""The kubedistill.io/v1alpha1 API: resource models and the stage contract."""

from kubedistill.api.alias import ModelAlias, ModelAliasSpec, ModelAliasStatus
from kubedistill.api.models import (
    API_VERSION,
    GROUP,
    STAGES,
    VERSION,
    DistillationJob,
    DistillationJobSpec,
    DistillationJobStatus,
    Phase,
    Stage,
    StageState,
)
from kubedistill.api.stage import StageInvocation, StageProgress, StageResult

__all__ = [
    "API_VERSION",
    "GROUP",
    "STAGES",
    "VERSION",
    "DistillationJob",
    "DistillationJobSpec",
    "DistillationJobStatus",
    "ModelAlias",
    "ModelAliasSpec",
    "ModelAliasStatus",
    "Phase",
    "Stage",
    "StageInvocation",
    "StageProgress",
    "StageResult",
    "StageState",
]
