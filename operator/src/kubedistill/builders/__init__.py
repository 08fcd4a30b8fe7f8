"""Pure manifest builders: (DistillationJob, stage, attempt, settings) → dicts the API server accepts."""

from kubedistill.builders.stage_job import (
    DATASET_FILE_ENV,
    artifact_root,
    build_invocation,
    build_stage_manifests,
    owner_reference,
    referenced_secrets,
)

__all__ = [
    "DATASET_FILE_ENV",
    "artifact_root",
    "build_invocation",
    "build_stage_manifests",
    "owner_reference",
    "referenced_secrets",
]
