"""Operator scale: N DistillationJobs created at once (N=10, then N=50) on the real control plane,
the whole measurement repeated three times; each figure is the median of the three, with its spread.

Stage pods run an instant stage (stdlib only: it writes the StageResult to result.json and the
termination log and exits), so the figures are the operator's and Kubernetes', not the stages'.

Per N: p50/p95 from CR creation (the create call returning) to its first Job appearing in a watch,
time until every job is Succeeded, API requests the operator made per job (every aiohttp request of
the operator process, kopf's included) and the operator's peak RSS and CPU seconds per job.

Ratios: `growth per job` = (time(N large) / time(N small)) ÷ (N large / N small): 1 is linear, below
1 is better (fixed costs amortised); target ≤ 1.0. The first-Job p50 at the large N, target ≤ 1 s, is
a time, not a ratio: it moves with the machine (on a shared machine it is mostly the control plane's
and the kubelet's), which is why the median of three and the spread are given. N=100 (the earlier
default) takes several minutes per repeat on two busy cores; `--sizes 10,100` measures it.

    python bench/operator_scale.py [--sizes 10,50] [--repeats 3] [--timeout 900]
    python bench/operator_scale.py --operator -n NS   # (internal) the counted operator process
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import finish, machine_banner, ratio

GROUP, VERSION = "kubedistill.io", "v1alpha1"
IMAGE = "kubedistill.bench/instant-stage"
REPO = Path(__file__).resolve().parents[1]
# Polling period for "all Succeeded": the totals are tens of seconds, so a quarter second is noise.
POLL_S = 0.25
KCM_QPS_ARGS = ["--kube-api-qps=300", "--kube-api-burst=600"]

INSTANT_STAGE = r"""
import json, os, sys
inv = json.loads(os.environ["KUBEDISTILL_JOB"])
stage, base = inv["stage"], inv["artifactBase"].rstrip("/")
metrics = {"evaluate": {"evalScore": 0.9, "teacherEvalScore": 1.0}}.get(stage, {})
artifacts = {"export": {"ggufURIs": {"q4_k_m": base + "/export/student-q4_k_m.gguf"}}}.get(stage, {})
result = {"stage": stage, "ok": True, "message": "instant", "metrics": metrics, "artifacts": artifacts}
if stage == "estimate":
    result["estimate"] = {"prompts": 2, "teacherCalls": 2}
text = json.dumps(result, separators=(",", ":"))
path = base[len("file://"):] + "/" + stage
os.makedirs(path, exist_ok=True)
with open(path + "/result.json", "w") as f:
    f.write(text)
with open(os.environ.get("KUBEDISTILL_TERMINATION_LOG", "/dev/termination-log"), "w") as f:
    f.write(text)
"""


# ------------------------------------------------------------------------------ the counted operator


def run_counted_operator(argv: list[str], count_file: Path) -> None:
    """The operator itself, with every aiohttp request counted and the count written on exit."""
    import aiohttp

    count = [0]
    original = aiohttp.ClientSession._request

    async def counted(self: aiohttp.ClientSession, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return await original(self, *args, **kwargs)

    aiohttp.ClientSession._request = counted  # type: ignore[method-assign]

    def write() -> None:
        count_file.write_text(str(count[0]))

    atexit.register(write)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from kubedistill.handlers.main import main

    main(argv)


# ------------------------------------------------------------------------------------------ harness


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "teacher": {"model": "openai/gpt-4o-mini"},
            "student": {"model": "qwen3-0.6b"},
            "dataset": {"prompts": ["What is 2+2?", "Name a colour."]},
            "curation": {"judge": {"majority": {}}},
            "promotion": {},
        },
    }


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("operator not healthy in time")


def measure(api: Any, kubeconfig: Path, workdir: Path, n: int, timeout: float) -> dict[str, Any]:
    from kubernetes import client, watch

    core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
    ns = f"bench-{n}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    while True:
        try:
            core.read_namespaced_service_account("default", ns)
            break
        except client.exceptions.ApiException:
            time.sleep(0.1)

    from kubedistill_testing.cluster import free_port
    from kubedistill_testing.operator_process import stop_process

    port = free_port()
    count_file = workdir / f"requests-{n}.txt"
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBEDISTILL_TRAINER_IMAGE": f"{IMAGE}:1",
        "KUBEDISTILL_ARTIFACT_ROOT": (workdir / "artifacts").as_uri(),
        "KUBEDISTILL_DEFAULT_TRAIN_GPUS": "0",
    }
    log = (workdir / f"operator-{n}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--operator",
            str(count_file),
            "-n",
            ns,
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
        created: dict[str, float] = {}
        first_job: dict[str, float] = {}
        succeeded: dict[str, float] = {}
        stop = threading.Event()

        def watch_jobs() -> None:
            # Reopen on any break (timeouts, 410 Gone); a first Job seen late only makes the figure worse.
            while not stop.is_set():
                w = watch.Watch()
                try:
                    for event in w.stream(batch.list_namespaced_job, ns, timeout_seconds=60):
                        obj = event["object"]
                        labels = obj.metadata.labels or {} if hasattr(obj, "metadata") else {}
                        owner = labels.get("kubedistill.io/job")
                        if owner and owner not in first_job:
                            first_job[owner] = time.monotonic()
                        if stop.is_set():
                            w.stop()
                except Exception:  # the stream broke: open another
                    time.sleep(0.1)

        watcher = threading.Thread(target=watch_jobs, daemon=True)
        watcher.start()
        time.sleep(0.5)  # the watch is open before the first create

        def create(i: int) -> None:
            name = f"job-{i:03d}"
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs", job_body(name))
            created[name] = time.monotonic()

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(create, range(n)))
        deadline = start + timeout
        while len(succeeded) < n and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited with {proc.returncode}")
            time.sleep(POLL_S)
            for obj in custom.list_namespaced_custom_object(GROUP, VERSION, ns, "distillationjobs")["items"]:
                if (obj.get("status") or {}).get("phase") == "Succeeded":
                    succeeded.setdefault(obj["metadata"]["name"], time.monotonic())
        stop.set()
        if len(succeeded) < n:
            raise RuntimeError(f"only {len(succeeded)}/{n} jobs succeeded in {timeout:.0f}s")
        total = max(succeeded.values()) - start
        latencies = sorted(max(0.0, first_job[k] - created[k]) for k in created)
        rss = peak_rss_mb(proc.pid)
        cpu = cpu_seconds(proc.pid)
    finally:
        stop_process(proc, timeout=30)
        core.delete_namespace(ns)
    requests = int(count_file.read_text()) if count_file.exists() else 0
    return {
        "n": n,
        "p50_first_job_s": round(statistics.median(latencies), 3),
        "p95_first_job_s": round(latencies[max(0, round(0.95 * len(latencies)) - 1)], 3),
        "all_succeeded_s": round(total, 2),
        "api_requests_per_job": round(requests / n, 1),
        "peak_rss_mb": round(rss, 1),
        "operator_cpu_s_per_job": round(cpu / n, 3),
    }


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the repeats."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--operator":
        run_counted_operator(sys.argv[3:], Path(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10,50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    machine = machine_banner()

    import yaml
    from kubernetes import client, config

    from kubedistill_testing import cluster
    from kubedistill_testing.kubelet import LocalKubelet

    workdir = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    stage_file = workdir / "instant_stage.py"
    stage_file.write_text(INSTANT_STAGE)
    existing = os.environ.get("KUBEDISTILL_TEST_KUBECONFIG")
    # The controller-manager's default client limit (20 QPS) caps the Job controller at ~4 pods/s,
    # which would make large N measure it rather than the operator; batch clusters raise it likewise.
    base_args = cluster.controller_manager_args
    cluster.controller_manager_args = lambda *a: [*base_args(*a), *KCM_QPS_ARGS]
    plane = None if existing else cluster.up(workdir / "controlplane")
    kubeconfig = Path(existing) if existing else plane.kubeconfig  # type: ignore[union-attr]
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        ext = client.ApiextensionsV1Api(api)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    try:
                        ext.create_custom_resource_definition(doc)
                    except client.exceptions.ApiException as err:
                        if err.status != 409:
                            raise
        time.sleep(2)  # CRDs established
        images = {IMAGE: [sys.executable, "-S", "-E", str(stage_file)]}
        with LocalKubelet.from_kubeconfig(
            kubeconfig,
            workdir / "kubelet",
            images=images,
            capacity={"pods": "1000", "cpu": "1000", "memory": "100Ti"},
        ):
            repeats = [
                [measure(api, kubeconfig, workdir, n, args.timeout) for n in sizes]
                for _ in range(args.repeats)
            ]
    finally:
        if plane is not None:
            plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for i, results in enumerate(repeats, start=1):
        for r in results:
            print(
                f"run {i} N={r['n']:>4}: first Job p50 {r['p50_first_job_s']:.3f}s p95 {r['p95_first_job_s']:.3f}s, "
                f"all Succeeded {r['all_succeeded_s']:.1f}s, {r['api_requests_per_job']:.0f} API requests/job, "
                f"peak RSS {r['peak_rss_mb']:.0f} MB, operator CPU {r['operator_cpu_s_per_job']:.2f}s/job"
            )
    small, large = sizes[0], sizes[-1]
    growth = [
        (results[-1]["all_succeeded_s"] / results[0]["all_succeeded_s"]) / (large / small)
        for results in repeats
    ]
    first_job = [results[-1]["p50_first_job_s"] for results in repeats]
    growth_spread, first_job_spread = spread(growth), spread(first_job)
    print(f"growth per job: {growth_spread}; first-Job p50 at N={large}: {first_job_spread} s")
    finish(
        "operator_scale",
        [
            ratio(
                f"growth per job, N={small} to N={large} (median of {len(repeats)})",
                growth_spread["median"],
                "<= 1.0",
            ),
            ratio(
                f"first Job p50 at N={large}, seconds (median of {len(repeats)})",
                first_job_spread["median"],
                "<= 1.0",
            ),
        ],
        machine,
        sizes=sizes,
        growth_per_job=growth_spread,
        p50_first_job_s=first_job_spread,
        peak_rss_mb=max(r["peak_rss_mb"] for results in repeats for r in results),
        operator_cpu_s_per_job=spread([results[-1]["operator_cpu_s_per_job"] for results in repeats]),
        api_requests_per_job=spread([results[-1]["api_requests_per_job"] for results in repeats]),
        runs=repeats,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
