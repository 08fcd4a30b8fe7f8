"""Dataset scale (issue 16): peak memory and time of the stages that read a whole dataset, as it grows.

Each stage runs as its own process, `python -m kubedistill_trainer STAGE`, exactly as in a pod; its
peak resident set is the kernel's (`wait4` → ru_maxrss), its time the wall clock.

- estimate: a synthetic JSONL dataset of N rows (~300 bytes a row, 5% of the lines malformed:
  broken JSON or no prompt), N = 10k, 100k, 1M by default. Counted without a tokenizer (every row
  exact), and with the tiny test model's tokenizer as a local student (first 20,000 rows exact, a
  2,000-row sample of the rest), so both counting modes are measured.
- curate: N prompts × 4 candidates as the generate stage writes them (shards of 100 rows), judged
  with `majority` and with `reference`, N = 10k and 250k by default (1M takes ~5 CPU minutes per
  judge here; `--curate-sizes 10000,1000000` measures it).
- generate: N prompts (default 20k), n=4 in one request, against the loopback teacher (no latency,
  64 in flight).
- the operator while the 1M-row job is estimated, on the real control plane (etcd, kube-apiserver,
  kube-controller-manager, the local kubelet running the estimate as a pod): its peak RSS before
  and after, and another job's reconciliation latency (its creation to its first stage Job)
  alone and while the big estimate runs. Skipped with `--operator-rows 0`.

The growth ratios divide the peak at the largest N by the peak at the smallest, in the same run:
`estimate_rss_growth` and `curate_rss_growth` (the larger of the two judges), goal ≤ 1.5 each.

    python bench/dataset_scale.py                      # the default run (~10 min on 2 busy cores)
    python bench/dataset_scale.py --sizes 10000,100000 --curate-sizes 10000,50000 --generate 5000

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCES = [
    str(REPO / "operator" / "src"),
    str(REPO / "trainer-image" / "src"),
    str(REPO / "tests" / "harness"),
]
sys.path[:0] = SOURCES

from kubedistill.api.models import DistillationJobSpec, Stage  # noqa: E402
from kubedistill.api.stage import JOB_FILE_ENV, TERMINATION_LOG_ENV, JobRef, StageInvocation  # noqa: E402

WORDS = [
    "invoice",
    "refund",
    "login",
    "crash",
    "export",
    "slow",
    "password",
    "billing",
    "account",
    "error",
    "feature",
    "shipping",
    "order",
]
LABELS = ["billing", "bug", "account", "feature_request", "shipping"]
SAMPLES = 4
SHARD_ROWS = 100
GOAL = 1.5
GROUP, VERSION = "kubedistill.io", "v1alpha1"
STAGE_IMAGE = "kubedistill.bench/fake-stage"


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_dataset(path: Path, rows: int, bad_every: int = 20) -> int:
    """N lines, every `bad_every`-th malformed (alternately broken JSON and a row without a prompt)."""
    rng = random.Random(rows)
    bad = 0
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            if i % bad_every == bad_every - 1:
                bad += 1
                f.write('{"id": "broken", "prompt": \n' if bad % 2 else json.dumps({"id": f"r{i}"}) + "\n")
                continue
            row = {"id": f"r{i}", "prompt": f"Ticket {i}: {text(rng, 30 + rng.randrange(20))}?"}
            row["reference"] = LABELS[i % len(LABELS)]
            f.write(json.dumps(row) + "\n")
    return bad


def write_candidates(directory: Path, prompts: int) -> None:
    """The generate stage's output for `prompts` prompts: shards of 100 rows, 4 candidates each."""
    rng = random.Random(prompts)
    shards = directory / "generate" / "candidates"
    shards.mkdir(parents=True, exist_ok=True)
    for start in range(0, prompts, SHARD_ROWS):
        lines = []
        for i in range(start, min(prompts, start + SHARD_ROWS)):
            label = LABELS[i % len(LABELS)]
            answers = [label, label, f"It is {label}.", rng.choice(LABELS)]
            row = {
                "id": f"r{i}",
                "split": "test" if i % 10 == 0 else "train",
                "prompt": f"Ticket {i}: {text(rng, 30)}?",
                "reference": label,
                "candidates": answers,
                "finishReasons": ["stop"] * SAMPLES,
                "usage": {"calls": 1, "inputTokens": 60, "outputTokens": 8},
                "costUSD": 0.0001,
                "model": "bench",
            }
            lines.append(json.dumps(row))
        (shards / f"shard-{start // SHARD_ROWS:05d}.jsonl").write_text("\n".join(lines) + "\n")


def spec(
    dataset: dict[str, Any], student: str = "smollm2-135m", judge: str = "majority", **extra: Any
) -> Any:
    return DistillationJobSpec.model_validate(
        {
            "teacher": {"model": "openai/gpt-4o-mini", **extra.pop("teacher", {})},
            "student": {"model": student},
            "dataset": dataset,
            "generation": {"nSamples": SAMPLES, "maxTokens": 64},
            "curation": {"judge": {judge: {}}, "topK": 2},
            **extra,
        }
    )


def run_stage(stage: Stage, job: Any, workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One stage process: wall seconds, peak RSS in MB, and its result.json."""
    inv = StageInvocation(
        job=JobRef(name="bench", namespace="bench", uid="bench"),
        spec=job,
        stage=stage,
        artifact_base=workdir.as_uri(),
    )
    inv_path = workdir / f"{stage.value}-invocation.json"
    inv_path.write_text(inv.model_dump_json(by_alias=True))
    child_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(SOURCES),
        JOB_FILE_ENV: str(inv_path),
        TERMINATION_LOG_ENV: str(workdir / f"{stage.value}.termination-log"),
    }
    log = (workdir / f"{stage.value}.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubedistill_trainer", stage.value], env=child_env, stdout=log, stderr=log
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads((workdir / stage.value / "result.json").read_text())
    if not result["ok"]:
        raise RuntimeError(f"{stage.value} failed: {result['reason']}: {result['message']}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "result": result}


def bench_estimate(root: Path, sizes: list[int], student: str | None) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        work = root / f"estimate-{n}-{'tok' if student else 'chars'}"
        work.mkdir(parents=True)
        data = root / f"dataset-{n}.jsonl"
        bad = write_dataset(data, n) if not data.exists() else (n // 20)
        job = spec({"uri": data.as_uri()}, student=student or "smollm2-135m")
        run = run_stage(Stage.ESTIMATE, job, work)
        breakdown = run["result"]["details"]
        assert breakdown["datasetRows"]["invalid"] == bad, breakdown["datasetRows"]
        out.append(
            {
                "rows": n,
                "file_mb": round(data.stat().st_size / 1e6, 1),
                "seconds": run["seconds"],
                "peak_rss_mb": run["peak_rss_mb"],
                "invalid_rows": bad,
                "counting": breakdown["counting"],
                "token_counting": breakdown["tokenCounting"],
            }
        )
        print(f"estimate {n:>9,} rows ({breakdown['tokenCounting']}): {run['seconds']:6.1f} s, "
              f"{run['peak_rss_mb']:6.1f} MB, {bad:,} invalid, {breakdown['counting']['mode']}", flush=True)  # fmt: skip
    return out


def bench_curate(root: Path, sizes: list[int], judge: str) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        work = root / f"curate-{judge}-{n}"
        write_candidates(work, n)
        run = run_stage(Stage.CURATE, spec({"prompts": ["x"]}, judge=judge), work)
        details = run["result"]["details"]
        out.append(
            {
                "prompts": n,
                "candidates": n * SAMPLES,
                "seconds": run["seconds"],
                "peak_rss_mb": run["peak_rss_mb"],
                "buckets": details["buckets"],
            }
        )
        print(f"curate {judge:>9} {n:>9,} prompts: {run['seconds']:6.1f} s, {run['peak_rss_mb']:6.1f} MB, "
              f"{details['buckets']} buckets", flush=True)  # fmt: skip
    return out


def bench_generate(root: Path, prompts: int) -> dict[str, Any]:
    work = root / f"generate-{prompts}"
    work.mkdir(parents=True)
    teacher = subprocess.Popen(
        [sys.executable, "-m", "kubedistill_testing.fake_teacher", "--latency", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(SOURCES)},
    )
    try:
        assert teacher.stdout is not None
        base_url = json.loads(teacher.stdout.readline())["baseURL"]
        catalog = work / "catalog"
        catalog.mkdir()
        (catalog / "teachers.yaml").write_text(
            f"providers:\n  bench: {{baseURL: '{base_url}', supportsN: true}}\n"
            "teachers:\n  - {id: bench/teacher, inputPerMTok: 1.0, outputPerMTok: 4.0, priceDate: '2026-12-03'}\n"
        )
        data = work / "prompts.jsonl"
        write_dataset(data, prompts, bad_every=10**9)
        job = spec(
            {"uri": data.as_uri()},
            teacher={"model": "bench/teacher", "maxConcurrency": 64, "timeoutSeconds": 60},
        )
        run = run_stage(Stage.GENERATE, job, work, {"KUBEDISTILL_CATALOG_DIR": str(catalog)})
    finally:
        teacher.terminate()
        teacher.wait()
    details = run["result"]["details"]
    print(f"generate {prompts:,} prompts × {SAMPLES}: {run['seconds']:.1f} s, {run['peak_rss_mb']:.1f} MB, "
          f"{details['requestsPerSecond']} requests/s", flush=True)  # fmt: skip
    return {
        "prompts": prompts,
        "seconds": run["seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
        "requests_per_second": details["requestsPerSecond"],
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM for {pid}")


def bench_operator(root: Path, dataset: Path, rows: int) -> dict[str, Any]:
    """The operator while a job of `rows` rows is estimated by its pod (the fake stage program runs
    the real estimate, and fakes the later stages)."""
    import statistics

    import yaml
    from kubernetes import client, config

    from kubedistill_testing import cluster
    from kubedistill_testing.kubelet import LocalKubelet

    os.environ["PYTHONPATH"] = os.pathsep.join(SOURCES)  # the kubelet's pods inherit it
    plane = cluster.up(root / "controlplane")
    operator: subprocess.Popen[bytes] | None = None
    try:
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        ext = client.ApiextensionsV1Api(api)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    ext.create_custom_resource_definition(doc)
        time.sleep(2)  # CRDs established
        core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
        ns = "bench"
        core.create_namespace({"metadata": {"name": ns}})
        images = {STAGE_IMAGE: [sys.executable, "-m", "kubedistill_testing.fake_stage"]}
        with LocalKubelet.from_kubeconfig(plane.kubeconfig, root / "kubelet", images=images):
            env = {
                **os.environ,
                "KUBECONFIG": str(plane.kubeconfig),
                "KUBEDISTILL_TRAINER_IMAGE": f"{STAGE_IMAGE}:1",
                "KUBEDISTILL_ARTIFACT_ROOT": (root / "artifacts").as_uri(),
                "KUBEDISTILL_DEFAULT_TRAIN_GPUS": "0",
            }
            log = (root / "operator.log").open("wb")
            operator = subprocess.Popen(
                [sys.executable, "-m", "kubedistill.handlers", "-n", ns], env=env, stdout=log, stderr=log
            )

            def body(name: str, dataset_spec: dict[str, Any]) -> dict[str, Any]:
                job = spec(dataset_spec, judge="majority").to_k8s()
                job["generation"]["nSamples"] = 2
                job["curation"]["topK"] = 1
                return {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "DistillationJob",
                    "metadata": {"name": name},
                    "spec": job,
                }

            def phase(name: str) -> str | None:
                obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs", name)
                return (obj.get("status") or {}).get("phase")

            def first_job_latency(name: str) -> float:
                """Seconds from creating a small job to its first stage Job: one reconciliation."""
                started = time.monotonic()
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, ns, "distillationjobs", body(name, {"prompts": ["a", "b"]})
                )
                while not batch.list_namespaced_job(ns, label_selector=f"kubedistill.io/job={name}").items:
                    if operator is None or operator.poll() is not None:
                        raise RuntimeError("the operator exited; see operator.log")
                    time.sleep(0.05)
                return time.monotonic() - started

            def wait(name: str, phases: set[str], timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while phase(name) not in phases:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} did not reach {phases}; see operator.log")
                    time.sleep(0.2)

            alone = [first_job_latency(f"alone-{i}") for i in range(3)]
            for i in range(3):
                wait(f"alone-{i}", {"Succeeded"}, 300)
            before = peak_rss_mb(operator.pid)
            started = time.monotonic()
            custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, "distillationjobs", body("big", {"uri": dataset.as_uri()})
            )
            wait("big", {"Estimating"}, 120)
            during = [first_job_latency(f"during-{i}") for i in range(3)]
            overlapped = phase("big") == "Estimating"
            wait("big", {"Generating", "Curating", "Training", "Exporting", "Evaluating", "Succeeded"}, 1800)
            estimated_s = time.monotonic() - started
            wait("big", {"Succeeded"}, 600)
            after = peak_rss_mb(operator.pid)
            restarts = 0 if operator.poll() is None else 1
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait()
        plane.stop()
    result = {
        "rows": rows,
        "operator_peak_rss_mb_before": before,
        "operator_peak_rss_mb_after": after,
        "operator_exited": bool(restarts),
        "big_job_estimated_s": round(estimated_s, 1),
        "first_job_latency_s_alone": round(statistics.median(alone), 3),
        "first_job_latency_s_during_estimate": round(statistics.median(during), 3),
        "latencies_measured_while_estimating": overlapped,
    }
    print(f"operator while {rows:,} rows are estimated: peak RSS {before} → {after} MB; another job's first "
          f"Job after {result['first_job_latency_s_during_estimate']} s (alone: "
          f"{result['first_job_latency_s_alone']} s)", flush=True)  # fmt: skip
    return result


def growth(runs: list[dict[str, Any]]) -> float | None:
    return round(runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3) if len(runs) > 1 else None


def sizes_arg(value: str) -> list[int]:
    return sorted(int(v.replace("_", "")) for v in value.split(",") if v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=sizes_arg, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--tokenizer-sizes", type=sizes_arg, default=[10_000, 1_000_000])
    parser.add_argument("--curate-sizes", type=sizes_arg, default=[10_000, 250_000])
    parser.add_argument("--generate", type=int, default=20_000, help="prompts for generate (0: skip)")
    parser.add_argument(
        "--operator-rows", type=int, default=1_000_000, help="rows of the job the operator watches (0: skip)"
    )
    args = parser.parse_args()
    before = machine()
    with tempfile.TemporaryDirectory(prefix="kd-dataset-scale-") as tmp:
        root = Path(tmp)
        estimate = bench_estimate(root, args.sizes, None)
        with_tokenizer: list[dict[str, Any]] = []
        if args.tokenizer_sizes:
            from kubedistill.local.tiny_model import tiny_llama

            with_tokenizer = bench_estimate(root, args.tokenizer_sizes, tiny_llama().as_uri())
        curate = {judge: bench_curate(root, args.curate_sizes, judge) for judge in ("majority", "reference")}
        generate = bench_generate(root, args.generate) if args.generate else None
        operator = None
        if args.operator_rows:
            data = root / f"dataset-{args.operator_rows}.jsonl"
            if not data.exists():
                write_dataset(data, args.operator_rows)
            operator = bench_operator(root, data, args.operator_rows)
    curate_growths = [g for g in (growth(runs) for runs in curate.values()) if g is not None]
    summary = {
        "bench": "dataset_scale",
        "machine": before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "estimate": estimate,
        "estimate_with_tokenizer": with_tokenizer,
        "curate": curate,
        "generate": generate,
        "operator": operator,
        "estimate_rss_growth": growth(estimate),
        "estimate_with_tokenizer_rss_growth": growth(with_tokenizer),
        "curate_rss_growth": max(curate_growths) if curate_growths else None,
        "estimate_peak_rss_mb": max((r["peak_rss_mb"] for r in estimate + with_tokenizer), default=None),
        "curate_peak_rss_mb": max((r["peak_rss_mb"] for runs in curate.values() for r in runs), default=None),
        "generate_peak_rss_mb": generate["peak_rss_mb"] if generate else None,
        "goal_rss_growth": GOAL,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
