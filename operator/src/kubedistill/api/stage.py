"""The contract between the operator (or local mode) and a stage process (DESIGN §3).

In:  env KUBEDISTILL_JOB holds a `StageInvocation` as JSON (or KUBEDISTILL_JOB_FILE a path to it).
     Secrets arrive only as env vars filled from secretKeyRef: see the *_ENV names below.
Out: `<artifactBase>/<stage>/result.json` (a full `StageResult`), the same result compacted to
     < 4 KiB in the termination log, exit code 0 on success, non-zero with `reason` on failure.
     While running, `<artifactBase>/<stage>/progress.json` (a `StageProgress`), which the operator
     polls, so stage pods need no RBAC at all.
     A stage run as several pods (generate with `generation.shards` > 1: an Indexed Job) writes
     both files per part, below `<artifactBase>/<stage>/parts/NNNN/`, NNNN its completion index;
     the operator sums them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kubedistill.api.models import Artifacts, DistillationJobSpec, Estimate, Metrics, Model, Stage

JOB_ENV = "KUBEDISTILL_JOB"
JOB_FILE_ENV = "KUBEDISTILL_JOB_FILE"
TERMINATION_LOG_ENV = "KUBEDISTILL_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TEACHER_API_KEY_ENV = "KUBEDISTILL_TEACHER_API_KEY"
JUDGE_API_KEY_ENV = "KUBEDISTILL_JUDGE_API_KEY"
S3_ENDPOINT_ENV = "KUBEDISTILL_S3_ENDPOINT"
S3_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
MAX_TERMINATION_MESSAGE = 4096

RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.json"
# Set by the Job controller in every pod of an Indexed Job.
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"


def part_uri(stage_uri: str, index: int) -> str:
    """Where part `index` of a sharded stage writes its result.json and progress.json."""
    return f"{stage_uri}/parts/{index:04d}"


class JobRef(Model):
    name: str = Field(description="DistillationJob name.")
    namespace: str = Field(description="DistillationJob namespace.")
    uid: str = Field(description="DistillationJob uid; part of the artifact prefix.")


class StageInvocation(Model):
    job: JobRef
    spec: DistillationJobSpec
    stage: Stage
    artifact_base: str = Field(description="s3://bucket/prefix/ns/name/uid or file:///dir; stage dirs below.")
    attempt: int = Field(default=1, ge=1)

    def stage_uri(self, stage: Stage | None = None) -> str:
        return f"{self.artifact_base.rstrip('/')}/{(stage or self.stage).value}"

    def parts(self) -> int:
        """How many pods (Indexed Job completions) this stage's work is split into."""
        return self.spec.generation.shards if self.stage == Stage.GENERATE else 1

    def report_uri(self, environ: Mapping[str, str] | None = None) -> str:
        """Where this process writes result.json and progress.json: its part's directory in a sharded stage."""
        if self.parts() == 1:
            return self.stage_uri()
        env = os.environ if environ is None else environ
        return part_uri(self.stage_uri(), int(env.get(COMPLETION_INDEX_ENV, "0")))


class StageResult(Model):
    stage: Stage
    ok: bool
    reason: str = Field(default="Succeeded", description="CamelCase reason, copied into status conditions.")
    message: str = ""
    metrics: Metrics = Field(default_factory=Metrics)
    artifacts: Artifacts = Field(default_factory=Artifacts)
    estimate: Estimate | None = Field(
        default=None, description="The estimate stage's figures, which the operator gates generate on."
    )
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="Stage-specific figures (histograms, tokens/s); not in the termination log.",
    )

    def termination_message(self) -> str:
        """The result without `details`, cut to fit Kubernetes' 4 KiB termination message."""
        compact = self.model_copy(update={"details": {}}).to_k8s()
        text = json.dumps(compact, separators=(",", ":"))
        if len(text.encode()) <= MAX_TERMINATION_MESSAGE:
            return text
        compact["message"] = compact.get("message", "")[:512]
        return json.dumps(compact, separators=(",", ":"))[:MAX_TERMINATION_MESSAGE]


class StageProgress(Model):
    stage: Stage
    done: int = 0
    total: int = 0
    detail: str = ""
    cost_usd: float = Field(default=0.0, alias="costUSD")
    eta_seconds: float | None = None
    loss: float | None = None
    updated_at: str | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 0.0


def load_invocation(environ: dict[str, str] | None = None) -> StageInvocation:
    env = os.environ if environ is None else environ
    if JOB_FILE_ENV in env:
        with open(env[JOB_FILE_ENV], encoding="utf-8") as f:
            return StageInvocation.model_validate_json(f.read())
    if JOB_ENV in env:
        return StageInvocation.model_validate_json(env[JOB_ENV])
    raise RuntimeError(f"neither {JOB_ENV} nor {JOB_FILE_ENV} is set: a stage needs its job")
