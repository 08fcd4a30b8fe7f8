"""Local mode's plan of a run: where it writes, which env stands for Secrets, what the stages get."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubedistill.api.jobfile import JobInvalid
from kubedistill.api.models import DistillationJobSpec, Stage
from kubedistill.api.stage import JUDGE_API_KEY_ENV, TEACHER_API_KEY_ENV, JobRef, StageInvocation

LOCAL_PREFIX = "local/"
LOCAL_NAMESPACE = "local"
_UID_NAMESPACE = uuid.UUID("6f1c2f0e-8a54-4f3e-9a49-5c7d5a1e0b11")


def stable_uid(name: str, preset: str | None = None) -> str:
    """Same name (and preset) → same uid → same artifact prefix: what lets a rerun resume."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{name}/{preset or ''}"))


def run_dir(workdir: Path, name: str, uid: str) -> Path:
    return workdir.resolve() / name / uid


def secret_env_names(key: str) -> list[str]:
    """Env vars that stand for a Secret key locally: the key as written, then in ENV_VAR form."""
    upper = key.upper().replace("-", "_").replace(".", "_")
    return [key] if upper == key else [key, upper]


def secret_env(spec: DistillationJobSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The stage env carrying the teacher's (and judge's) key; JobInvalid names what to set."""
    out: dict[str, str] = {}
    missing: list[str] = []
    refs = [("spec.teacher.apiKeySecretRef", spec.teacher.api_key_secret_ref, TEACHER_API_KEY_ENV)]
    for where, judge in (
        ("spec.curation.judge", spec.curation.judge),
        ("spec.evaluation.judge", spec.evaluation.judge),
    ):
        if judge is not None and judge.llm is not None and judge.llm.api_key_secret_ref is not None:
            refs.append((f"{where}.llm.apiKeySecretRef", judge.llm.api_key_secret_ref, JUDGE_API_KEY_ENV))
    for where, ref, target in refs:
        if ref is None:
            continue
        names = [*secret_env_names(ref.key), target]
        value = next((environ[n] for n in names if environ.get(n)), None)
        if value is None:
            missing.append(f"{where}: set env {' or '.join(names)} (local mode reads Secret keys from env)")
        else:
            out[target] = value
    if missing:
        raise JobInvalid(missing)
    return out


def effective_spec(
    spec: DistillationJobSpec, teacher_base_url: str | None, student_dir: Path | None
) -> DistillationJobSpec:
    """The spec the stages get locally: the local teacher's URL and student directory filled in."""
    update: dict[str, Any] = {}
    if teacher_base_url is not None:
        update["teacher"] = spec.teacher.model_copy(update={"base_url": teacher_base_url})
    if student_dir is not None:
        update["student"] = spec.student.model_copy(update={"model": student_dir.as_uri()})
    return spec.model_copy(update=update)


def needs_teacher(stage: Stage, spec: DistillationJobSpec) -> bool:
    """Whether a stage calls the teacher's endpoint: generate, and an LLM judge that has no URL of its own."""
    if stage == Stage.GENERATE:
        return True
    judge = {
        Stage.CURATE: spec.curation.judge,
        Stage.EVALUATE: spec.evaluation.judge or spec.curation.judge,
    }.get(stage)
    return judge is not None and judge.llm is not None and judge.llm.base_url is None


def invocation(name: str, uid: str, spec: DistillationJobSpec, stage: Stage, base: str) -> StageInvocation:
    # Local mode runs one process a stage: generation shards are pods of a cluster (training over
    # several processes needs torchrun's PET_* env, which only the operator sets).
    one_shard = spec.model_copy(update={"generation": spec.generation.model_copy(update={"shards": 1})})
    return StageInvocation(
        job=JobRef(name=name, namespace=LOCAL_NAMESPACE, uid=uid),
        spec=one_shard,
        stage=stage,
        artifact_base=base,
    )


def spec_fingerprint(spec: DistillationJobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_k8s(), sort_keys=True).encode()).hexdigest()[:16]
