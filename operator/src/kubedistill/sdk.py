"""`Distiller`: the Python client our users know from the hosted product, over the Kubernetes API.

    from kubedistill import Distiller

    d = Distiller(namespace="team-a")                   # kubeconfig/context like kubectl
    job = d.create(name="ticket-triage v1", dataset_id="support-tickets",
                   teacher_model="openai/gpt-4o", student_model="llama-3.2-1b")
    job = d.wait(job["id"], on_update=lambda u: print(u["status"], u.get("phase")))
    arts = d.artifacts(job["id"])                       # adapter_path, gguf_paths, metrics
    d.register_model(id="smart", adapter_path=arts["adapter_path"], gguf_path=arts["gguf_paths"]["q4_k_m"])

A job is a `DistillationJob` object; its id is the object's name (`name` made DNS-safe:
"ticket-triage v1" → "ticket-triage-v1"; the original stays in an annotation). `status` in the
returned dicts is coarse and lowercase (pending, running, succeeded, failed, suspended); `phase` is
the resource's own phase (Generating, Training…).

Where `dataset_id` points (first match wins):
1. a URI (`s3://…`, `file://…`) is used as it is;
2. a ConfigMap of that name in the namespace: its only key, else its `dataset.jsonl` key;
3. `<datasets_uri>/<dataset_id>.jsonl`, where `datasets_uri` is the constructor argument or env
   `KUBEDISTILL_DATASETS_URI` (e.g. `s3://my-bucket/datasets`);
otherwise `NotFound`. `create_dataset(id, rows)` stores rows as such a ConfigMap.

Errors are `kubedistill.errors` types (NotFound, Invalid, Conflict, Forbidden…) with the API
server's message. The kubernetes client is imported lazily: `estimate`, `teacher_models` and
`student_models` work offline, without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubedistill import dataset as ds
from kubedistill.api.models import API_VERSION, GROUP, VERSION, Phase, Stage
from kubedistill.catalog import Catalog, load_catalog
from kubedistill.domain.estimate import estimate as estimate_spec
from kubedistill.errors import (
    Conflict,
    DistillerError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
    from_status,
)

if TYPE_CHECKING:
    from kubernetes import client as k8s

__all__ = ["Conflict", "Distiller", "DistillerError", "Forbidden", "Invalid", "NotFound", "Unauthorized"]

JOBS = "distillationjobs"
ALIASES = "modelaliases"
DATASETS_URI_ENV = "KUBEDISTILL_DATASETS_URI"
DATASET_KEY = "dataset.jsonl"
DISPLAY_NAME_ANNOTATION = f"{GROUP}/display-name"
DEFAULT_QUANTIZATIONS = ("q4_k_m", "q8_0")

_COARSE: dict[str, str] = {
    Phase.SUCCEEDED: "succeeded",
    Phase.FAILED: "failed",
    Phase.SUSPENDED: "suspended",
    Phase.PENDING: "pending",
    Phase.ESTIMATING: "pending",
}
TERMINAL = frozenset({"succeeded", "failed"})
# `Distiller.list` shadows the builtin inside the class body.
Dicts = list[dict[str, Any]]


# ------------------------------------------------------------------------------- pure mapping


def job_id(name: str) -> str:
    """A DNS-1123 name from a display name: lowercase, runs of other characters become one '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not slug:
        raise Invalid(f"metadata.name: {name!r} has no letter or digit to build a name from")
    return slug


def coarse_status(phase: str | None) -> str:
    if not phase:
        return "pending"
    return _COARSE.get(phase, "running")


def dataset_spec(
    dataset_id: str, configmap_keys: Sequence[str] | None, datasets_uri: str | None
) -> dict[str, Any]:
    """`spec.dataset` for a dataset id (see the module docstring for the order)."""
    if "://" in dataset_id:
        return {"uri": dataset_id}
    if configmap_keys is not None:
        keys = list(configmap_keys)
        key = keys[0] if len(keys) == 1 else DATASET_KEY
        if key not in keys:
            raise Invalid(
                f"ConfigMap {dataset_id} has keys {keys}: name one {DATASET_KEY!r} or keep only one"
            )
        return {"configMapRef": {"name": dataset_id, "key": key}}
    if datasets_uri:
        return {"uri": f"{datasets_uri.rstrip('/')}/{dataset_id}.jsonl"}
    raise NotFound(
        f"dataset {dataset_id!r}: no ConfigMap of that name, and no datasets_uri "
        f"(or env {DATASETS_URI_ENV}) to look for {dataset_id}.jsonl in"
    )


def _secret_ref(value: str | tuple[str, str] | None) -> dict[str, str] | None:
    """`"name/key"` or `(name, key)` → a secretKeyRef; the key's value never passes through here."""
    if value is None:
        return None
    name, key = value if isinstance(value, tuple) else value.split("/", 1) if "/" in value else (value, "")
    if not key:
        raise Invalid(f"spec.teacher.apiKeySecretRef: {value!r} must be 'secret-name/key'")
    return {"name": name, "key": key}


def _judge(judge: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(judge, str):
        return {judge: {}}
    return dict(judge)


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def job_body(
    name: str,
    dataset: Mapping[str, Any],
    teacher_model: str,
    student_model: str,
    *,
    num_prompts: int | None = 500,
    n_samples: int = 4,
    training_steps: int = 100,
    bond_beta: float = 0.5,
    bond_gamma: float = 0.1,
    export_gguf: bool = True,
    quantization_types: Sequence[str] = DEFAULT_QUANTIZATIONS,
    top_k: int = 2,
    judge: str | Mapping[str, Any] = "llm",
    teacher_base_url: str | None = None,
    teacher_api_key_secret: str | tuple[str, str] | None = None,
    system_prompt: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    test_fraction: float | None = None,
    alias: str | None = None,
    min_eval_score: float | None = None,
    max_teacher_cost_usd: float | None = None,
    labels: Mapping[str, str] | None = None,
    spec_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DistillationJob object `Distiller.create` submits: the seed's keywords → the CRD's fields."""
    teacher: dict[str, Any] = {"model": teacher_model}
    if teacher_base_url:
        teacher["baseURL"] = teacher_base_url
    ref = _secret_ref(teacher_api_key_secret)
    if ref:
        teacher["apiKeySecretRef"] = ref
    generation: dict[str, Any] = {"nSamples": n_samples}
    for key, value in (
        ("systemPrompt", system_prompt),
        ("maxTokens", max_tokens),
        ("temperature", temperature),
    ):
        if value is not None:
            generation[key] = value
    data = dict(dataset)
    if num_prompts is not None:
        data["numPrompts"] = num_prompts
    if test_fraction is not None:
        data["testFraction"] = test_fraction
    spec: dict[str, Any] = {
        "teacher": teacher,
        "student": {"model": student_model},
        "dataset": data,
        "generation": generation,
        "curation": {"judge": _judge(judge), "topK": top_k},
        "training": {"steps": training_steps, "bondBeta": bond_beta, "bondGamma": bond_gamma},
        "export": {"gguf": export_gguf, "quantizations": list(quantization_types)},
    }
    promotion = {k: v for k, v in (("alias", alias), ("minEvalScore", min_eval_score)) if v is not None}
    if promotion:
        spec["promotion"] = promotion
    if max_teacher_cost_usd is not None:
        spec["budget"] = {"maxTeacherCostUSD": max_teacher_cost_usd}
    if spec_overrides:
        spec = deep_merge(spec, spec_overrides)
    metadata: dict[str, Any] = {"name": job_id(name)}
    if metadata["name"] != name:
        metadata["annotations"] = {DISPLAY_NAME_ANNOTATION: name}
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": API_VERSION, "kind": "DistillationJob", "metadata": metadata, "spec": spec}


def summary(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A job object as the dict `create`, `get`, `list` and `wait` return."""
    meta, status = obj.get("metadata", {}), obj.get("status") or {}
    phase = status.get("phase")
    progress = status.get("progress") or {}
    return {
        "id": meta.get("name"),
        "name": meta.get("annotations", {}).get(DISPLAY_NAME_ANNOTATION, meta.get("name")),
        "namespace": meta.get("namespace"),
        "uid": meta.get("uid"),
        "status": coarse_status(phase),
        "phase": phase,
        "stage": progress.get("stage"),
        "progress": progress.get("percent", 0.0),
        "detail": progress.get("detail"),
        "message": _ready_message(status),
        "teacher_model": obj.get("spec", {}).get("teacher", {}).get("model"),
        "student_model": obj.get("spec", {}).get("student", {}).get("model"),
        "created_at": meta.get("creationTimestamp"),
        "completed_at": status.get("completionTime"),
        "metrics": status.get("metrics") or {},
    }


def _ready_message(status: Mapping[str, Any]) -> str | None:
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    for kind in ("Failed", "Ready"):
        if kind in conditions and conditions[kind].get("message"):
            return str(conditions[kind]["message"])
    return None


def artifacts_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's `artifacts()` shape from a job's status."""
    status = obj.get("status") or {}
    arts, metrics = status.get("artifacts") or {}, status.get("metrics") or {}
    return {
        "adapter_path": arts.get("adapterURI"),
        "merged_path": arts.get("mergedURI"),
        "gguf_paths": dict(arts.get("ggufURIs") or {}),
        "eval_path": arts.get("evalURI"),
        "dataset_path": arts.get("datasetURI"),
        "metrics": {
            "teacher_cost_total": metrics.get("teacherCostTotal"),
            "student_loss_final": metrics.get("studentLossFinal"),
            "training_time_sec": metrics.get("trainingTimeSec"),
            "eval_score": metrics.get("evalScore"),
            "teacher_eval_score": metrics.get("teacherEvalScore"),
            "retention": metrics.get("retention"),
            "teacher_calls": metrics.get("teacherCalls"),
            "curated": metrics.get("curated"),
        },
    }


def alias_target(
    adapter_path: str | None, gguf_path: str | None, base_model: str | None, distillation_job: str | None
) -> dict[str, Any]:
    if distillation_job:
        return {"distillationJob": distillation_job}
    target = {"ggufURI": gguf_path, "adapterURI": adapter_path, "baseModel": base_model}
    return {k: v for k, v in target.items() if v}


def estimate_body(
    student_model: str,
    num_prompts: int,
    n_samples: int,
    teacher_model: str,
    max_tokens: int | None,
    training_steps: int,
    judge: str | Mapping[str, Any],
    system_prompt: str | None,
) -> dict[str, Any]:
    generation: dict[str, Any] = {"nSamples": n_samples}
    if max_tokens is not None:
        generation["maxTokens"] = max_tokens
    if system_prompt:
        generation["systemPrompt"] = system_prompt
    return {
        "teacher": {"model": teacher_model},
        "student": {"model": student_model},
        "dataset": {"prompts": ["x"], "numPrompts": num_prompts},
        "generation": generation,
        "curation": {"judge": _judge(judge), "topK": min(2, n_samples)},
        "training": {"steps": training_steps},
    }


def estimate_dict(report: Any, catalog: Catalog, teacher_model: str) -> dict[str, Any]:
    e = report.estimate
    teacher = catalog.resolve_teacher(teacher_model)
    return {
        "estimated_cost": round(e.teacher_cost_usd + e.judge_cost_usd, 6),
        "teacher_cost": round(e.teacher_cost_usd, 6),
        "judge_cost": round(e.judge_cost_usd, 6),
        "teacher_calls": e.teacher_calls,
        "input_tokens": e.input_tokens,
        "output_tokens": e.output_tokens,
        "gpu_minutes": e.gpu_minutes,
        "sufficient": e.fits_budget,
        "tier": "local" if teacher.provider == "local" else "api",
        "is_sandbox": False,
        "breakdown": report.breakdown,
    }


# ------------------------------------------------------------------------------------- client


class Distiller:
    """DistillationJobs and ModelAliases in one namespace of one cluster, like `kubectl -n NS`."""

    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        *,
        datasets_uri: str | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self._kubeconfig = str(kubeconfig) if kubeconfig else None
        self._context = context
        self._namespace = namespace
        self._api: k8s.ApiClient | None = None
        self.datasets_uri = datasets_uri or os.environ.get(DATASETS_URI_ENV)
        self._catalog = catalog

    # ------------------------------------------------------------------------ connection

    @property
    def api(self) -> k8s.ApiClient:
        if self._api is None:
            from kubernetes import config

            try:
                if self._kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                    self._api = config.new_client_from_config(
                        config_file=self._kubeconfig, context=self._context
                    )
                else:
                    config.load_incluster_config()
                    from kubernetes import client

                    self._api = client.ApiClient()
            except config.ConfigException as err:
                raise DistillerError(f"no cluster to talk to: {err}") from err
            _send_bearer_token(self._api.configuration)
        return self._api

    @property
    def namespace(self) -> str:
        if self._namespace is None:
            self._namespace = _context_namespace(self._kubeconfig, self._context)
        return self._namespace

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog()
        return self._catalog

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _objects(self) -> k8s.CustomObjectsApi:
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    @property
    def _core(self) -> k8s.CoreV1Api:
        from kubernetes import client

        return client.CoreV1Api(self.api)

    # ------------------------------------------------------------------------------- jobs

    def create(
        self,
        name: str,
        dataset_id: str,
        teacher_model: str,
        student_model: str,
        num_prompts: int | None = 500,
        n_samples: int = 4,
        training_steps: int = 100,
        bond_beta: float = 0.5,
        bond_gamma: float = 0.1,
        export_gguf: bool = True,
        quantization_types: Sequence[str] = DEFAULT_QUANTIZATIONS,
        **options: Any,
    ) -> dict[str, Any]:
        """Submit a DistillationJob; returns {"id", "status", "phase", …}.

        `options` are `job_body`'s keywords: top_k, judge ("llm" | "majority" | "reference" | a
        judge dict), teacher_base_url, teacher_api_key_secret ("secret/key"), system_prompt,
        max_tokens, temperature, test_fraction, alias, min_eval_score, max_teacher_cost_usd,
        labels, spec_overrides (merged into the spec last).
        """
        body = job_body(
            name,
            self.resolve_dataset(dataset_id),
            teacher_model,
            student_model,
            num_prompts=num_prompts,
            n_samples=n_samples,
            training_steps=training_steps,
            bond_beta=bond_beta,
            bond_gamma=bond_gamma,
            export_gguf=export_gguf,
            quantization_types=quantization_types,
            **options,
        )
        return summary(self.apply(body, replace=False))

    def apply(self, body: Mapping[str, Any], replace: bool = True) -> dict[str, Any]:
        """Create the object, or replace its spec when it exists (what `kubectl apply` does for us).

        With `replace=False` an existing object of that name is a Conflict.
        """
        return self.apply_object(body, replace)[0]

    def apply_object(self, body: Mapping[str, Any], replace: bool = True) -> tuple[dict[str, Any], str]:
        """`apply`, also saying what happened: "created" or "configured"."""
        kind = body.get("kind")
        plural = {"DistillationJob": JOBS, "ModelAlias": ALIASES}.get(str(kind))
        if plural is None or body.get("apiVersion") not in (None, API_VERSION):
            raise Invalid(
                f"{body.get('apiVersion')}/{kind} is not a {API_VERSION} DistillationJob or ModelAlias"
            )
        body = {"apiVersion": API_VERSION, **body}
        name = body.get("metadata", {}).get("name")
        namespace = body.get("metadata", {}).get("namespace") or self.namespace
        with _translated():
            try:
                created: dict[str, Any] = self._objects.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, body, field_validation="Strict"
                )
                return created, "created"
            except _api_exception() as err:
                if getattr(err, "status", None) != 409 or not replace:
                    raise
            current = self._objects.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
            replacement = {**current, "spec": body.get("spec", {})}
            for key in ("labels", "annotations"):
                if key in body.get("metadata", {}):
                    replacement["metadata"][key] = {
                        **current["metadata"].get(key, {}),
                        **body["metadata"][key],
                    }
            replaced: dict[str, Any] = self._objects.replace_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, replacement, field_validation="Strict"
            )
            return replaced, "configured"

    def raw(self, id: str) -> dict[str, Any]:
        """The DistillationJob object as the API server has it."""
        with _translated():
            obj: dict[str, Any] = self._objects.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOBS, id
            )
        return obj

    def get(self, id: str) -> dict[str, Any]:
        return summary(self.raw(id))

    def list(self, label_selector: str | None = None) -> Dicts:
        return [summary(o) for o in self.raw_list(label_selector)]

    def raw_list(self, label_selector: str | None = None) -> Dicts:
        """The namespace's DistillationJob objects, by name."""
        with _translated():
            found = self._objects.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOBS, label_selector=label_selector or ""
            )
        items: Dicts = found.get("items", [])
        return sorted(items, key=lambda o: str(o["metadata"]["name"]))

    def wait(
        self,
        id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Watch the job until it succeeds or fails; `on_update` gets each changed summary.

        Returns the final summary (check `status`). A job deleted while watched raises NotFound.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[Any, ...] | None = None
        for obj in self.watch(id, deadline):
            current = summary(obj)
            key = (current["status"], current["phase"], current["progress"], current["detail"])
            if key != last:
                last = key
                if on_update is not None:
                    on_update(current)
            if current["status"] in TERMINAL:
                return current
        raise TimeoutError(f"distillation job {id} did not finish within {timeout} s")

    def watch(self, id: str, deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """The job object now and after each change, until `deadline` (monotonic) if given."""
        from kubernetes import watch

        obj = self.raw(id)
        yield obj
        version = obj["metadata"]["resourceVersion"]
        while deadline is None or time.monotonic() < deadline:
            left = 60 if deadline is None else max(1, min(60, int(deadline - time.monotonic())))
            w = watch.Watch()
            with _translated():
                try:
                    for event in w.stream(
                        self._objects.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        self.namespace,
                        JOBS,
                        field_selector=f"metadata.name={id}",
                        resource_version=version,
                        timeout_seconds=left,
                    ):
                        if event["type"] == "DELETED":
                            raise NotFound(f'distillationjobs.{GROUP} "{id}" was deleted')
                        if event["type"] == "ERROR":
                            break
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        yield obj
                except _api_exception() as err:
                    if getattr(err, "status", None) != 410:  # Gone: resume from a fresh read below
                        raise
                finally:
                    w.stop()
            obj = self.raw(id)
            version = obj["metadata"]["resourceVersion"]
            yield obj

    def artifacts(self, id: str) -> dict[str, Any]:
        return artifacts_view(self.raw(id))

    def cancel(self, id: str) -> dict[str, Any]:
        """Stop the running stage and start nothing new (spec.suspend); `resume` undoes it."""
        return summary(self._patch_job(id, {"spec": {"suspend": True}}))

    def resume(self, id: str) -> dict[str, Any]:
        return summary(self._patch_job(id, {"spec": {"suspend": False}}))

    def delete(self, id: str) -> None:
        with _translated():
            self._objects.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, JOBS, id)

    def _patch_job(self, id: str, patch: dict[str, Any]) -> dict[str, Any]:
        with _translated():
            patched: dict[str, Any] = self._objects.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, JOBS, id, patch
            )
        return patched

    def logs(self, id: str, stage: str | Stage, tail_lines: int | None = None) -> str:
        """Logs of the pod of the stage's latest Job attempt."""
        stage = Stage(stage)
        status = self.raw(id).get("status") or {}
        entry = next((s for s in status.get("stages") or [] if s.get("name") == stage.value), None)
        if not entry or not entry.get("jobName"):
            raise NotFound(f"distillation job {id} has not started its {stage.value} stage")
        with _translated():
            pods = self._core.list_namespaced_pod(
                self.namespace, label_selector=f"job-name={entry['jobName']}"
            ).items
            if not pods:
                raise NotFound(f"no pod left for job {entry['jobName']} (stage {stage.value} of {id})")
            newest = max(pods, key=lambda p: p.metadata.creation_timestamp)
            kwargs = {"tail_lines": tail_lines} if tail_lines else {}
            # Raw bytes, decoded here: kubernetes client 36.0 returns the repr of the bytes as the str
            # (kubernetes-client/python#2596).
            response = self._core.read_namespaced_pod_log(
                newest.metadata.name, self.namespace, _preload_content=False, **kwargs
            )
        return str(response.data.decode("utf-8", errors="replace"))

    # ---------------------------------------------------------------------------- datasets

    def resolve_dataset(self, dataset_id: str) -> dict[str, Any]:
        keys: list[str] | None = None
        if "://" not in dataset_id:
            with _translated():
                try:
                    cm = self._core.read_namespaced_config_map(dataset_id, self.namespace)
                    keys = sorted((cm.data or {}).keys())
                except _api_exception() as err:
                    if getattr(err, "status", None) != 404:
                        raise
        return dataset_spec(dataset_id, keys, self.datasets_uri)

    def create_dataset(self, id: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Store rows as the ConfigMap `id` (key dataset.jsonl); ConfigMaps hold up to ~1 MiB."""
        text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
        parsed = ds.parse_lines(text.splitlines())
        if parsed.rejected:
            first = parsed.rejected[0]
            raise Invalid(f"dataset {id}: line {first.line}: {first.reason}")
        body = {"metadata": {"name": job_id(id)}, "data": {DATASET_KEY: text}}
        with _translated():
            try:
                self._core.create_namespaced_config_map(self.namespace, body)
            except _api_exception() as err:
                if getattr(err, "status", None) != 409:
                    raise
                self._core.replace_namespaced_config_map(body["metadata"]["name"], self.namespace, body)
        return {"id": body["metadata"]["name"], "rows": len(parsed.rows)}

    # ------------------------------------------------------------------ estimate, catalogs

    def estimate(
        self,
        student_model: str,
        num_prompts: int = 500,
        n_samples: int = 4,
        teacher_model: str = "openai/gpt-4o",
        *,
        max_tokens: int | None = None,
        training_steps: int = 100,
        judge: str | Mapping[str, Any] = "llm",
        system_prompt: str | None = None,
        rows: Sequence[Mapping[str, Any]] | None = None,
        mean_prompt_chars: int = 400,
    ) -> dict[str, Any]:
        """Teacher dollars and GPU minutes before anything runs; offline.

        Token counts come from `rows` when given (the real dataset), else from `num_prompts`
        prompts of `mean_prompt_chars` characters.
        """
        from kubedistill.api.models import DistillationJobSpec

        spec = DistillationJobSpec.model_validate(
            estimate_body(
                student_model,
                num_prompts,
                n_samples,
                teacher_model,
                max_tokens,
                training_steps,
                judge,
                system_prompt,
            )
        )
        parsed = (
            ds.rows_from_json(rows)
            if rows is not None
            else [ds.Row(id=str(i), prompt="x" * mean_prompt_chars) for i in range(num_prompts)]
        )
        report = estimate_spec(spec, parsed, self.catalog)
        return estimate_dict(report, self.catalog, teacher_model)

    def teacher_models(self) -> Dicts:
        out = []
        for t in self.catalog.teachers.values():
            resolved = self.catalog.resolve_teacher(t.id)
            out.append(
                {
                    "id": t.id,
                    "provider": resolved.provider,
                    "base_url": resolved.base_url,
                    "input_per_m_tok": t.input_per_m_tok,
                    "output_per_m_tok": t.output_per_m_tok,
                    "price_date": t.price_date,
                }
            )
        return out

    def student_models(self) -> Dicts:
        return [
            {
                "id": s.id,
                "hf_id": s.hf_id,
                "params": f"{s.params_b:g}B",
                "params_b": s.params_b,
                "min_vram_gb": s.min_vram_gb,
                "typical_training_minutes": s.typical_training_minutes,
                "lora_target_modules": self.catalog.lora_targets(s.id),
            }
            for s in self.catalog.students.values()
        ]

    # ------------------------------------------------------------------------- aliases

    def register_model(
        self,
        id: str,
        adapter_path: str | None = None,
        gguf_path: str | None = None,
        *,
        base_model: str | None = None,
        distillation_job: str | None = None,
    ) -> dict[str, Any]:
        """Create the ModelAlias `id`, or re-point it; the operator keeps the previous target in history."""
        target = alias_target(adapter_path, gguf_path, base_model, distillation_job)
        body = {
            "apiVersion": API_VERSION,
            "kind": "ModelAlias",
            "metadata": {"name": id, "namespace": self.namespace},
            "spec": {"target": target},
        }
        return alias_view(self.apply(body))

    def alias(self, id: str) -> dict[str, Any]:
        with _translated():
            obj = self._objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, ALIASES, id)
        return alias_view(obj)

    def rollback_alias(self, id: str) -> dict[str, Any]:
        """Point the alias back at its previous target (the newest entry of status.history)."""
        with _translated():
            obj = self._objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, ALIASES, id)
        history = (obj.get("status") or {}).get("history") or []
        if not history:
            raise NotFound(f"ModelAlias {id} has no previous target to roll back to")
        # A merge patch: null removes the current target's keys that the previous one lacks.
        target = {**dict.fromkeys(obj["spec"]["target"]), **history[0]["target"]}
        with _translated():
            patched = self._objects.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, ALIASES, id, {"spec": {"target": target}}
            )
        return alias_view(patched)


def alias_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    status = obj.get("status") or {}
    ready: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    return {
        "id": obj.get("metadata", {}).get("name"),
        "target": obj.get("spec", {}).get("target", {}),
        "gguf_path": status.get("ggufURI"),
        "adapter_path": status.get("adapterURI"),
        "model": status.get("model"),
        "ready": ready.get("status") == "True",
        "message": ready.get("message"),
        "history": [h.get("target") for h in status.get("history") or []],
    }


def _context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context in use, like kubectl; `default` when it names none."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not kubeconfig:
        path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        if path.is_file():
            return path.read_text().strip()
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError):
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return str(((chosen or {}).get("context") or {}).get("namespace") or "default")


def _api_exception() -> type[Exception]:
    from kubernetes.client.exceptions import ApiException

    return ApiException


@contextmanager
def _translated() -> Iterator[None]:
    """API server errors → typed errors carrying the server's message."""
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as err:
        raise from_status(err.status, err.body, str(err.reason or "")) from None


def _send_bearer_token(cfg: Any) -> None:
    """Make the generated client send a kubeconfig's or a ServiceAccount's token.

    kubernetes 36's loaders store the token under api_key["authorization"], but its generated
    API classes only send api_key["BearerToken"]: without this, a token kubeconfig (most managed
    clusters, in-cluster) talks to the API server as system:anonymous.
    """
    if "authorization" in cfg.api_key and "BearerToken" not in cfg.api_key:
        cfg.api_key["BearerToken"] = cfg.api_key["authorization"]
