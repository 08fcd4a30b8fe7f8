"""A stage program that honours the stage contract without any ML: for operator tests and benchmarks.

    python -m kubedistill_testing.fake_stage STAGE

The estimate stage is never faked: it is the real program (`kubedistill_trainer.estimate`), cheap
without a tokenizer, so every operator test shows the dataset read by a pod, with the pod's own
credentials, and the operator gating on what it reported. Nor is `fetch` (the model server's init
container, `fake_stage fetch --uri … --out …`): it is the trainer's own copy.

It reads the invocation like the real stages (KUBEDISTILL_JOB / KUBEDISTILL_JOB_FILE), writes
progress.json while it "works", then result.json and the termination message, and exits 0 or 1.
What it does is scripted through env (the operator's KUBEDISTILL_STAGE_ENV setting passes it on):

- KUBEDISTILL_FAKE_FAIL="train:1,curate:9"   fail attempts 1..N of a stage, with
- KUBEDISTILL_FAKE_FAIL_MESSAGE="..."       this message (default names stage and attempt);
- KUBEDISTILL_FAKE_SLEEP="2" or "train:30"   seconds of work (all stages, or per stage);
- KUBEDISTILL_FAKE_HOLD="train:/tmp/go"      after that, keep working until this file exists;
- KUBEDISTILL_FAKE_SCORE="0.9"              evaluate's evalScore (teacher scores 1.0);
- KUBEDISTILL_FAKE_GGUF="s3://…/model.gguf"  export copies this real GGUF to each quantisation's URI, so a
                                            promoted alias has a file that llama-server can serve.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from kubedistill import store
from kubedistill.api.models import Artifacts, Metrics, Stage
from kubedistill.api.stage import (
    DEFAULT_TERMINATION_LOG,
    PROGRESS_FILE,
    RESULT_FILE,
    TERMINATION_LOG_ENV,
    StageInvocation,
    StageProgress,
    StageResult,
    load_invocation,
)
from kubedistill_trainer import estimate
from kubedistill_trainer.runtime import execute

FAIL_ENV = "KUBEDISTILL_FAKE_FAIL"
FAIL_MESSAGE_ENV = "KUBEDISTILL_FAKE_FAIL_MESSAGE"
SLEEP_ENV = "KUBEDISTILL_FAKE_SLEEP"
HOLD_ENV = "KUBEDISTILL_FAKE_HOLD"
SCORE_ENV = "KUBEDISTILL_FAKE_SCORE"
GGUF_ENV = "KUBEDISTILL_FAKE_GGUF"
PROGRESS_EVERY_S = 0.5


def per_stage(value: str, stage: Stage) -> str | None:
    """`"train:1,curate:2"` → the value for `stage`; a bare value applies to every stage."""
    for part in value.split(","):
        part = part.strip()
        if ":" in part:
            name, _, setting = part.partition(":")
            if name.strip() == stage.value:
                return setting.strip()
        elif part:
            return part
    return None


def failing(env: Mapping[str, str], stage: Stage, attempt: int) -> bool:
    setting = per_stage(env.get(FAIL_ENV, ""), stage)
    return setting is not None and attempt <= int(setting)


def outputs(inv: StageInvocation, env: Mapping[str, str]) -> tuple[Metrics, Artifacts]:
    """Plausible figures per stage, so status.metrics/artifacts fill as in a real run."""
    prompts = len(inv.spec.dataset.prompts or []) or (inv.spec.dataset.num_prompts or 10)
    n = inv.spec.generation.n_samples
    base = inv.artifact_base.rstrip("/")
    if inv.stage == Stage.GENERATE:
        return (
            Metrics(
                teacher_calls=prompts * n,
                teacher_input_tokens=prompts * n * 20,
                teacher_output_tokens=prompts * n * 50,
                teacher_cost_total=0.01 * prompts,
                candidates=prompts * n,
            ),
            Artifacts(dataset_uri=f"{base}/generate/dataset", candidates_uri=f"{base}/generate/candidates"),
        )
    if inv.stage == Stage.CURATE:
        return Metrics(curated=prompts * inv.spec.curation.top_k), Artifacts(
            curated_uri=f"{base}/curate/curated"
        )
    if inv.stage == Stage.TRAIN:
        return Metrics(student_loss_final=0.42, training_time_sec=1.0), Artifacts(
            adapter_uri=f"{base}/train/adapter"
        )
    if inv.stage == Stage.EXPORT:
        gguf = {q: f"{base}/export/student-{q}.gguf" for q in inv.spec.export.quantizations}
        return Metrics(), Artifacts(merged_uri=f"{base}/export/merged", gguf_uris=gguf or None)
    score = float(env.get(SCORE_ENV, "0.9"))
    return Metrics(eval_score=score, teacher_eval_score=1.0, retention=score), Artifacts(
        eval_uri=f"{base}/evaluate"
    )


def write_termination_message(result: StageResult, env: Mapping[str, str]) -> None:
    path = env.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(result.termination_message())
    except OSError:
        pass  # no termination log outside a container: result.json still says it all


def run(inv: StageInvocation, env: Mapping[str, str]) -> StageResult:
    if inv.stage == Stage.ESTIMATE:
        return execute(estimate.run, inv)
    stage_uri = inv.stage_uri()
    seconds = float(per_stage(env.get(SLEEP_ENV, ""), inv.stage) or 0)
    hold = per_stage(env.get(HOLD_ENV, ""), inv.stage)
    started = time.monotonic()
    steps = 10
    while True:
        elapsed = time.monotonic() - started
        done = steps if seconds <= 0 else min(steps, int(steps * elapsed / seconds))
        progress = StageProgress(
            stage=inv.stage,
            done=done,
            total=steps,
            detail=f"fake {inv.stage.value} step {done}/{steps}",
            updated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        store.write_bytes(f"{stage_uri}/{PROGRESS_FILE}", progress.model_dump_json(by_alias=True).encode())
        if elapsed >= seconds and (hold is None or os.path.exists(hold)):
            break
        time.sleep(PROGRESS_EVERY_S if hold else min(PROGRESS_EVERY_S, max(0.0, seconds - elapsed)))
    if failing(env, inv.stage, inv.attempt):
        message = env.get(FAIL_MESSAGE_ENV) or f"fake {inv.stage.value} failure on attempt {inv.attempt}"
        return StageResult(stage=inv.stage, ok=False, reason="FakeFailure", message=message)
    metrics, artifacts = outputs(inv, env)
    if env.get(GGUF_ENV):
        model = store.read_bytes(env[GGUF_ENV])
        for uri in (artifacts.gguf_uris or {}).values():
            store.write_bytes(uri, model)
    return StageResult(
        stage=inv.stage, ok=True, message=f"fake {inv.stage.value} done", metrics=metrics, artifacts=artifacts
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["fetch"]:  # the model server's init container: never faked, the real copy
        from kubedistill_trainer import fetch

        fetch.main(args[1:])
        return 0
    env = dict(os.environ)
    inv = load_invocation(env)
    if args and args[0] != inv.stage.value:
        print(f"asked for stage {args[0]} but the invocation is for {inv.stage.value}", file=sys.stderr)
        return 2
    print(f"{inv.stage.value} attempt {inv.attempt}: started", flush=True)
    result = run(inv, env)
    store.write_bytes(f"{inv.stage_uri()}/{RESULT_FILE}", result.model_dump_json(by_alias=True).encode())
    write_termination_message(result, env)
    print(f"{inv.stage.value} attempt {inv.attempt}: {'ok' if result.ok else result.message}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
