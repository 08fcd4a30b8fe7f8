"""DistillationJob and ModelAlias (kubedistill.io/v1alpha1) as pydantic models.

The models are the single source of truth: the CRDs in `crds/` are generated from them, the
operator parses every object through them and local mode validates job YAML with them, so a bad
field gets the same message everywhere. YAML is camelCase, Python is snake_case.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubedistill.io"
VERSION = "v1alpha1"
API_VERSION: Literal["kubedistill.io/v1alpha1"] = "kubedistill.io/v1alpha1"

# Kubernetes object names (DNS-1123 subdomain) and label-ish identifiers.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
Name = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
ModelId = Annotated[str, Field(min_length=1, max_length=512)]
# A Kueue LocalQueue name: it goes into the kueue.x-k8s.io/queue-name label, so it must be a label value.
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
QueueName = Annotated[str, Field(min_length=1, max_length=63, pattern=LABEL_VALUE_PATTERN)]
Uri = Annotated[str, Field(min_length=1, max_length=2048)]


class Stage(StrEnum):
    # The estimate runs first, as a stage Job of its own: the operator never reads a dataset.
    ESTIMATE = "estimate"
    GENERATE = "generate"
    CURATE = "curate"
    TRAIN = "train"
    EXPORT = "export"
    EVALUATE = "evaluate"


STAGES: tuple[Stage, ...] = tuple(Stage)
GPU_STAGES: frozenset[Stage] = frozenset({Stage.TRAIN})

Quantization = Literal["q4_k_m", "q5_k_m", "q8_0"]
TeacherMode = Literal["sync", "batch", "auto"]
SUPPORTED_QUANTIZATIONS: tuple[str, ...] = ("q4_k_m", "q5_k_m", "q8_0")


class Model(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusModel(Model):
    """What the operator and its stages write, not what users do: read leniently, so an operator rolled back
    across an upgrade still reads a status that a newer one wrote (a field it does not know is dropped on
    read, and left in the object by its merge patches) instead of failing every job as an invalid spec."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", validate_default=True
    )


# ---------------------------------------------------------------------------------------- spec


class SecretKeyRef(Model):
    name: Name = Field(description="Name of a Secret in the job's namespace.")
    key: SecretKey = Field(description="Key inside the Secret.")


class ConfigMapKeyRef(Model):
    name: Name = Field(description="Name of a ConfigMap in the job's namespace.")
    key: SecretKey = Field(description="Key inside the ConfigMap holding JSONL rows.")


class TeacherSpec(Model):
    model: ModelId = Field(
        description="Catalog id such as openai/gpt-4o, or any model name an OpenAI-compatible endpoint serves."
    )
    base_url: Uri | None = Field(
        default=None,
        alias="baseURL",
        description="OpenAI-compatible base URL ending in /v1; defaults to the catalog's URL for the provider.",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding the teacher's API key; never copied anywhere else."
    )
    max_concurrency: int = Field(default=16, ge=1, le=1024, description="Requests in flight at once.")
    requests_per_minute: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Client-side request rate limit."
    )
    tokens_per_minute: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Client-side token rate limit (input + output)."
    )
    timeout_seconds: float = Field(default=120.0, gt=0, le=3600, description="Per-request timeout.")
    mode: TeacherMode = Field(
        default="sync",
        description="sync: one request per prompt as it goes; batch: the provider's batch API (about half "
        "the price, results within 24h); auto: batch when the catalog lists one for the provider and the "
        "job has enough requests.",
    )


class StudentSpec(Model):
    model: ModelId = Field(
        description="Catalog id (qwen3-0.6b), Hugging Face id, or a URI (file://, s3://) of a model directory."
    )


# A duration back from the window's end ("7d", "12h", "30m", "2w") or an RFC 3339 time.
TIME_OR_DURATION_PATTERN = r"^([0-9]{1,6}[smhdw]|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))$"
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
)


class FromTrafficSpec(Model):
    alias: Name = Field(
        description="ModelAlias (in the job's namespace) whose recorded requests become rows."
    )
    since: Annotated[str, Field(max_length=64, pattern=TIME_OR_DURATION_PATTERN)] = Field(
        description="Start of the window: an RFC 3339 time, or a duration (7d, 12h, 30m, 2w) before its end."
    )
    until: Annotated[str, Field(max_length=64, pattern=RFC3339_PATTERN)] | None = Field(
        default=None,
        description="End of the window (RFC 3339, exclusive); defaults to the job's creation, so every "
        "stage and retry reads the same requests.",
    )
    max_rows: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many kept rows (oldest first)."
    )
    dedupe: bool = Field(default=True, description="Drop requests whose normalised prompt was seen before.")
    system_prompt: Literal["keep", "drop"] = Field(
        default="keep",
        description="keep: a recorded system message stays in the row, and the student learns with it; "
        "drop: it is removed, and the student learns to answer without it (give the teacher an "
        "instruction with generation.systemPrompt).",
    )
    uri: Uri | None = Field(
        default=None,
        description="Where the alias records (its spec.recording.destination); defaults to the operator's "
        "recordings prefix for this namespace and alias.",
    )


class DatasetSpec(Model):
    uri: Uri | None = Field(
        default=None,
        description="s3:// or file:// URI of a JSONL file of {id, prompt|messages, system?, reference?}.",
    )
    config_map_ref: ConfigMapKeyRef | None = Field(
        default=None, description="ConfigMap key holding JSONL rows."
    )
    prompts: list[Annotated[str, Field(max_length=32768)]] | None = Field(
        default=None, max_length=10000, description="Inline prompts, for small jobs."
    )
    from_traffic: FromTrafficSpec | None = Field(
        default=None, description="The requests a ModelAlias's gateway recorded in a time window."
    )
    num_prompts: int | None = Field(default=None, ge=1, le=10_000_000, description="Cap on prompts taken.")
    test_fraction: float = Field(
        default=0.1,
        ge=0.0,
        le=0.9,
        description="Share of rows held out for evaluation, split by a hash of id.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> DatasetSpec:
        sources = [
            s for s in (self.uri, self.config_map_ref, self.prompts, self.from_traffic) if s is not None
        ]
        if len(sources) != 1:
            raise ValueError("exactly one of uri, configMapRef, prompts or fromTraffic must be set")
        return self


class FewShotExample(Model):
    user: Annotated[str, Field(max_length=32768)] = Field(
        description="An example input, sent as a user turn."
    )
    assistant: Annotated[str, Field(max_length=32768)] = Field(
        description="The answer wanted for it, sent as the assistant's turn."
    )


MAX_GENERATION_SHARDS = 256
MAX_TRAINING_NODES = 64


class GenerationSpec(Model):
    n_samples: int = Field(default=4, ge=1, le=32, description="Teacher candidates per prompt.")
    temperature: float = Field(default=0.8, gt=0.0, le=2.0, description="Sampling temperature (> 0).")
    max_tokens: int = Field(default=512, ge=1, le=32768, description="Maximum tokens per teacher answer.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Sampling seed, where supported.")
    system_prompt: str | None = Field(
        default=None,
        max_length=65536,
        description="Instruction sent to the teacher only; the student never sees it.",
    )
    few_shot: list[FewShotExample] | None = Field(
        default=None,
        max_length=64,
        description="Worked examples sent to the teacher only, as chat turns ahead of each prompt.",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=MAX_GENERATION_SHARDS,
        description="Generation pods (an Indexed Job): each asks the teacher for the prompts with "
        "hash(id) % shards == its index, with 1/shards of the rate limits and of the budget.",
    )

    def few_shot_turns(self) -> list[dict[str, str]]:
        """The examples as alternating user/assistant messages."""
        return [
            {"role": role, "content": text}
            for example in self.few_shot or ()
            for role, text in (("user", example.user), ("assistant", example.assistant))
        ]


class LLMJudge(Model):
    model: ModelId | None = Field(default=None, description="Judge model; defaults to the teacher's model.")
    base_url: Uri | None = Field(
        default=None, alias="baseURL", description="Judge endpoint; defaults to the teacher's."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding the judge's API key; defaults to the teacher's."
    )
    rubric: str | None = Field(default=None, max_length=16384, description="What a good answer looks like.")


class JsonSchemaJudge(Model):
    json_schema: dict[str, Any] = Field(
        alias="schema", description="JSON Schema that a good answer, parsed as JSON, validates against."
    )


class EmptyJudge(Model):
    pass


class JudgeSpec(Model):
    llm: LLMJudge | None = Field(default=None, description="An LLM scores each answer 0..1.")
    json_schema: JsonSchemaJudge | None = Field(
        default=None, description="Score 1 when the answer validates."
    )
    reference: EmptyJudge | None = Field(
        default=None, description="Exact match / token F1 against each row's reference."
    )
    majority: EmptyJudge | None = Field(
        default=None, description="Agreement with the most common normalised answer among the samples."
    )

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> JudgeSpec:
        kinds = [k for k in ("llm", "json_schema", "reference", "majority") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("exactly one of llm, jsonSchema, reference or majority must be set")
        return self

    @property
    def kind(self) -> str:
        return next(
            k for k in ("llm", "json_schema", "reference", "majority") if getattr(self, k) is not None
        )


def _default_judge() -> JudgeSpec:
    return JudgeSpec(llm=LLMJudge())


class CurationSpec(Model):
    judge: JudgeSpec = Field(default_factory=_default_judge, description="How candidates are scored.")
    top_k: int = Field(default=2, ge=1, le=32, description="Best candidates kept per prompt.")


class LoraSpec(Model):
    r: int = Field(default=16, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, le=1024, description="LoRA alpha.")
    dropout: float = Field(default=0.05, ge=0.0, le=0.9, description="LoRA dropout.")
    target_modules: list[Annotated[str, Field(max_length=128)]] | None = Field(
        default=None, max_length=64, description="Modules to adapt; defaults to the student catalog's."
    )


class DistributedSpec(Model):
    nodes: int = Field(
        default=1, ge=1, le=MAX_TRAINING_NODES, description="Train pods (an Indexed Job), one per node."
    )
    gpus_per_node: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="GPUs (and torchrun processes) per pod; defaults to the operator's train GPUs.",
    )
    procs_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="torchrun processes per pod on a CPU-only operator profile (no GPUs); default 1.",
    )

    @model_validator(mode="after")
    def _gpus_or_procs(self) -> DistributedSpec:
        if self.gpus_per_node is not None and self.procs_per_node is not None:
            raise ValueError("set gpusPerNode or procsPerNode, not both")
        return self

    def explicit_processes(self) -> int:
        """Processes per pod as the spec states them (gpusPerNode may instead come from the operator)."""
        return self.gpus_per_node or self.procs_per_node or 1


class TrainingSpec(Model):
    steps: int = Field(default=100, ge=1, le=1_000_000, description="Optimiser steps.")
    bond_beta: float = Field(default=0.5, ge=0.0, le=1.0, description="SFT (0) ↔ preference (1) blend.")
    bond_gamma: float = Field(
        default=0.1, ge=0.0, le=10.0, description="KL regularisation toward the initial student."
    )
    preference_scale: float = Field(default=0.1, gt=0.0, le=10.0, description="τ in the preference term.")
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    batch_size: int = Field(default=4, ge=1, le=1024, description="Prompts per micro-batch.")
    gradient_accumulation: int = Field(default=1, ge=1, le=1024, description="Micro-batches per step.")
    max_seq_length: int = Field(default=1024, ge=16, le=131072, description="Tokens per sequence, truncated.")
    warmup_ratio: float = Field(default=0.1, ge=0.0, le=0.5, description="Share of steps spent warming up.")
    checkpoint_every: int = Field(default=25, ge=1, le=1_000_000, description="Steps between checkpoints.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA adapter shape.")
    distributed: DistributedSpec | None = Field(
        default=None,
        description="Data-parallel training over nodes × GPUs (torchrun, DDP); the global batch stays "
        "batchSize × gradientAccumulation, which must be at least the number of processes.",
    )


def _default_quantizations() -> list[Quantization]:
    return ["q4_k_m", "q8_0"]


class ExportSpec(Model):
    gguf: bool = Field(default=True, description="Convert the merged student to GGUF for llama.cpp.")
    quantizations: list[Quantization] = Field(
        default_factory=_default_quantizations, max_length=3, description="GGUF quantisations to produce."
    )


class EvaluationSpec(Model):
    enabled: bool = Field(default=True, description="Score the student against the teacher on held-out rows.")
    judge: JudgeSpec | None = Field(default=None, description="Defaults to the curation judge.")
    max_rows: int | None = Field(default=None, ge=1, le=100_000, description="Cap on held-out rows scored.")


class PromotionSpec(Model):
    alias: Name | None = Field(default=None, description="ModelAlias to point at the student on success.")
    min_eval_score: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Promote only at or above this score."
    )
    canary_weight: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Promote the student as the alias's canary with this weight (percent) instead of as primary.",
    )


class BudgetSpec(Model):
    max_teacher_cost_usd: float | None = Field(
        default=None,
        alias="maxTeacherCostUSD",
        ge=0.0,
        description="Stop before spending more on the teacher.",
    )


class StorageSpec(Model):
    bucket: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="S3 bucket; defaults to the operator's."
    )
    prefix: Annotated[str, Field(max_length=512)] | None = Field(default=None, description="Key prefix.")
    endpoint: Uri | None = Field(
        default=None, description="S3 endpoint URL (MinIO); defaults to the operator's."
    )
    credentials_secret_ref: Name | None = Field(
        default=None,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; defaults to the operator's.",
    )
    delete_on_job_deletion: bool = Field(default=False, description="Delete artifacts with the job.")


class ResourceRequirements(Model):
    requests: dict[str, Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, description="Container resource requests."
    )
    limits: dict[str, Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, description="Container resource limits."
    )


class StageOverrides(Model):
    resources: ResourceRequirements | None = Field(default=None, description="Container resources.")
    gpus: int | None = Field(default=None, ge=0, le=16, description="nvidia.com/gpu limit.")
    node_selector: dict[str, Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, description="Pod nodeSelector."
    )
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, max_length=32, description="Pod tolerations."
    )
    affinity: dict[str, Any] | None = Field(default=None, description="Pod affinity.")
    priority_class_name: Name | None = Field(default=None, description="Pod priorityClassName.")
    image: Annotated[str, Field(max_length=512)] | None = Field(
        default=None, description="Stage image override."
    )


class StageResources(Model):
    estimate: StageOverrides | None = Field(default=None, description="Overrides for the estimate stage.")
    generate: StageOverrides | None = Field(default=None, description="Overrides for the generate stage.")
    curate: StageOverrides | None = Field(default=None, description="Overrides for the curate stage.")
    train: StageOverrides | None = Field(default=None, description="Overrides for the train stage.")
    export: StageOverrides | None = Field(default=None, description="Overrides for the export stage.")
    evaluate: StageOverrides | None = Field(default=None, description="Overrides for the evaluate stage.")

    def for_stage(self, stage: Stage) -> StageOverrides | None:
        overrides: StageOverrides | None = getattr(self, stage.value)
        return overrides


class DistillationJobSpec(Model):
    teacher: TeacherSpec = Field(description="The large model whose answers are distilled. Immutable.")
    student: StudentSpec = Field(description="The small model that is trained. Immutable.")
    dataset: DatasetSpec = Field(description="Prompts to distil. Immutable.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Teacher sampling.")
    curation: CurationSpec = Field(
        default_factory=CurationSpec, description="Judging and best-of-N selection."
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="LoRA fine-tune with the BOND loss."
    )
    export: ExportSpec = Field(default_factory=ExportSpec, description="Adapter, merged weights and GGUF.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Held-out evaluation.")
    promotion: PromotionSpec = Field(default_factory=PromotionSpec, description="ModelAlias re-pointing.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Spending limits.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where artifacts are kept.")
    resources: StageResources = Field(default_factory=StageResources, description="Per-stage pod overrides.")
    retries: int = Field(default=2, ge=0, le=10, description="Retries of each stage after a failed attempt.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=30 * 24 * 3600, description="Fail the whole job after this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=365 * 24 * 3600,
        description="Delete the job's children this long after it ends.",
    )
    suspend: bool = Field(default=False, description="Stop the running stage and start nothing new.")
    queue_name: QueueName | None = Field(
        default=None,
        description=(
            "Kueue LocalQueue for every stage Job (label kueue.x-k8s.io/queue-name); defaults to the "
            "operator's queue. Kueue then decides when each stage starts."
        ),
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> DistillationJobSpec:
        if self.curation.top_k > self.generation.n_samples:
            raise ValueError("curation.topK must not exceed generation.nSamples")
        prompts = self.dataset.num_prompts or (len(self.dataset.prompts) if self.dataset.prompts else None)
        if prompts is not None and self.generation.shards > prompts:
            raise ValueError(
                f"spec.generation.shards ({self.generation.shards}) exceeds the {prompts} prompts"
            )
        d, accumulation = self.training.distributed, self.training.gradient_accumulation
        if d is not None and d.nodes * d.explicit_processes() > accumulation:
            raise ValueError(
                f"spec.training.gradientAccumulation ({accumulation}) must be at least distributed.nodes × "
                "processes per node: each process takes whole micro-batches of the global batch"
            )
        return self


# -------------------------------------------------------------------------------------- status


class Phase(StrEnum):
    PENDING = "Pending"
    ESTIMATING = "Estimating"
    GENERATING = "Generating"
    CURATING = "Curating"
    TRAINING = "Training"
    EXPORTING = "Exporting"
    EVALUATING = "Evaluating"
    PROMOTING = "Promoting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


STAGE_PHASE: dict[Stage, Phase] = {
    Stage.ESTIMATE: Phase.ESTIMATING,
    Stage.GENERATE: Phase.GENERATING,
    Stage.CURATE: Phase.CURATING,
    Stage.TRAIN: Phase.TRAINING,
    Stage.EXPORT: Phase.EXPORTING,
    Stage.EVALUATE: Phase.EVALUATING,
}


class StageState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    BACKOFF = "BackOff"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"


class Condition(StatusModel):
    type: Annotated[str, Field(max_length=316)] = Field(description="Condition type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: Annotated[str, Field(max_length=1024)] = Field(default="", description="CamelCase reason.")
    message: Annotated[str, Field(max_length=32768)] = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, ge=0, description="Generation the condition is for."
    )


class StageStatus(StatusModel):
    name: Stage = Field(description="Stage name.")
    job_name: Annotated[str, Field(max_length=63)] | None = Field(
        default=None, description="batch/v1 Job of the latest attempt."
    )
    state: StageState = Field(
        default=StageState.PENDING, description="Pending, Running, BackOff, Succeeded..."
    )
    attempts: int = Field(default=0, ge=0, description="Attempts started so far.")
    start_time: str | None = Field(default=None, description="First attempt's start (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the stage ended (RFC 3339).")
    message: Annotated[str, Field(max_length=4096)] | None = Field(default=None, description="Last outcome.")


class Progress(StatusModel):
    stage: Stage | None = Field(default=None, description="Stage reporting progress.")
    percent: float = Field(default=0.0, ge=0.0, le=100.0, description="Whole-pipeline completion, 0-100.")
    detail: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Stage's own words."
    )
    updated_at: str | None = Field(default=None, description="When the stage last reported (RFC 3339).")


class TrafficCounts(StatusModel):
    found: int = Field(default=0, ge=0, description="Recorded requests in the window.")
    kept: int = Field(default=0, ge=0, description="Requests that became dataset rows.")
    deduplicated: int = Field(default=0, ge=0, description="Requests dropped as repeats of a kept prompt.")
    rejected: int = Field(default=0, ge=0, description="Recorded objects that failed validation.")
    over_max_rows: int = Field(default=0, ge=0, description="Requests not read once maxRows were kept.")
    since: str | None = Field(default=None, description="Start of the window read (RFC 3339).")
    until: str | None = Field(default=None, description="End of the window read (RFC 3339, exclusive).")


class Estimate(StatusModel):
    prompts: int = Field(default=0, ge=0, description="Prompts that will be sent to the teacher.")
    teacher_calls: int = Field(default=0, ge=0, description="Teacher requests (n samples per prompt).")
    input_tokens: int = Field(default=0, ge=0, description="Teacher input tokens.")
    output_tokens: int = Field(default=0, ge=0, description="Teacher output tokens.")
    teacher_cost_usd: float = Field(
        default=0.0, ge=0.0, alias="teacherCostUSD", description="Teacher dollars."
    )
    judge_cost_usd: float = Field(default=0.0, ge=0.0, alias="judgeCostUSD", description="LLM judge dollars.")
    gpu_minutes: float = Field(default=0.0, ge=0.0, description="Expected training GPU minutes.")
    train_nodes: int = Field(default=1, ge=1, description="Train pods (spec.training.distributed.nodes).")
    train_processes_per_node: int | None = Field(
        default=None,
        ge=1,
        description="GPUs (or CPU processes) per train pod as the spec states them; unset: the operator's default.",
    )
    generation_shards: int = Field(default=1, ge=1, description="Generation pods (spec.generation.shards).")
    fits_budget: bool = Field(default=True, description="Whether the cost fits budget.maxTeacherCostUSD.")
    teacher_mode: Literal["sync", "batch"] | None = Field(
        default=None, description="How the teacher is assumed to be called (teacher.mode resolved)."
    )
    cached_input_tokens: int | None = Field(
        default=None, ge=0, description="Input tokens predicted to be read from the provider's prompt cache."
    )
    traffic: TrafficCounts | None = Field(
        default=None, description="With dataset.fromTraffic: what the recorded requests became."
    )


class Artifacts(StatusModel):
    dataset_uri: Uri | None = Field(default=None, alias="datasetURI", description="Normalised dataset split.")
    candidates_uri: Uri | None = Field(default=None, alias="candidatesURI", description="Teacher candidates.")
    curated_uri: Uri | None = Field(
        default=None, alias="curatedURI", description="Judged and kept candidates."
    )
    adapter_uri: Uri | None = Field(default=None, alias="adapterURI", description="LoRA adapter.")
    merged_uri: Uri | None = Field(default=None, alias="mergedURI", description="Merged safetensors.")
    gguf_uris: dict[str, Uri] | None = Field(
        default=None, alias="ggufURIs", description="GGUF per quantisation."
    )
    eval_uri: Uri | None = Field(default=None, alias="evalURI", description="Per-row evaluation.")


class Metrics(StatusModel):
    teacher_calls: int | None = Field(default=None, ge=0, description="Successful teacher requests.")
    teacher_input_tokens: int | None = Field(default=None, ge=0, description="Billed input tokens.")
    teacher_output_tokens: int | None = Field(default=None, ge=0, description="Billed output tokens.")
    teacher_cost_total: float | None = Field(default=None, ge=0.0, description="Teacher dollars spent.")
    teacher_cached_input_tokens: int | None = Field(
        default=None, ge=0, description="Billed input tokens read from the provider's prompt cache."
    )
    teacher_saving_usd: float | None = Field(
        default=None,
        alias="teacherSavingUSD",
        description="Saved against synchronous, uncached prices (batch discount and cached input).",
    )
    candidates: int | None = Field(default=None, ge=0, description="Candidates generated.")
    curated: int | None = Field(default=None, ge=0, description="Candidates kept by curation.")
    student_loss_final: float | None = Field(default=None, description="BOND loss at the last step.")
    training_time_sec: float | None = Field(default=None, ge=0.0, description="Wall time of training.")
    eval_score: float | None = Field(default=None, description="Student's mean judge score, held-out rows.")
    teacher_eval_score: float | None = Field(default=None, description="Teacher's mean score, same rows.")
    retention: float | None = Field(default=None, description="evalScore / teacherEvalScore.")
    # Speed, per request and taken apart: a whole-request tokens/s of short answers is mostly prompt
    # processing and overhead. Prompt/decode rates are llama.cpp's own timings (the student's GGUF; a
    # teacher only when its server reports them, as llama.cpp's does).
    teacher_latency_p50_sec: float | None = Field(
        default=None, ge=0.0, description="Teacher request latency, median."
    )
    teacher_latency_p95_sec: float | None = Field(
        default=None, ge=0.0, description="Teacher request latency, p95."
    )
    teacher_prompt_tokens_per_second: float | None = Field(
        default=None, ge=0.0, description="Teacher prompt processing, from its server's timings."
    )
    teacher_decode_tokens_per_second: float | None = Field(
        default=None, ge=0.0, description="Teacher decoding, from its server's timings."
    )
    student_latency_p50_sec: float | None = Field(
        default=None, ge=0.0, description="Student answer latency, median."
    )
    student_latency_p95_sec: float | None = Field(
        default=None, ge=0.0, description="Student answer latency, p95."
    )
    student_prompt_tokens_per_second: float | None = Field(
        default=None, ge=0.0, description="Student prompt processing, llama.cpp's timings."
    )
    student_decode_tokens_per_second: float | None = Field(
        default=None, ge=0.0, description="Student decoding, llama.cpp's timings."
    )


class DistillationJobStatus(StatusModel):
    phase: Phase | None = Field(default=None, description="Derived from observation of the stage Jobs.")
    conditions: list[Condition] = Field(default_factory=list, max_length=32, description="Ready, Complete...")
    observed_generation: int | None = Field(default=None, ge=0, description="Last generation acted on.")
    stages: list[StageStatus] = Field(default_factory=list, max_length=8, description="One entry per stage.")
    progress: Progress | None = Field(default=None, description="Latest progress of the running stage.")
    estimate: Estimate | None = Field(default=None, description="Cost and size estimate before any Job.")
    artifacts: Artifacts | None = Field(default=None, description="URIs of the outputs.")
    metrics: Metrics | None = Field(default=None, description="Figures reported by the stages.")
    start_time: str | None = Field(default=None, description="When the first stage started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the job ended (RFC 3339).")


class ObjectMeta(BaseModel):
    """The few metadata fields the product reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None


class DistillationJob(Model):
    api_version: Literal["kubedistill.io/v1alpha1"] = API_VERSION
    kind: Literal["DistillationJob"] = "DistillationJob"
    metadata: ObjectMeta
    spec: DistillationJobSpec
    status: DistillationJobStatus | None = None


_MOVED_TO_ALIAS = frozenset(
    {"AliasTarget", "ModelAliasSpec", "AliasHistoryEntry", "ModelAliasStatus", "ModelAlias"}
)


def __getattr__(name: str) -> Any:
    # The ModelAlias models live in api/alias.py; `models.ModelAlias` keeps working for callers
    # written before the move (resolved lazily: alias.py imports this module).
    if name in _MOVED_TO_ALIAS:
        from kubedistill.api import alias

        return getattr(alias, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
