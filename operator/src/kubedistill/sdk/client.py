"""`Distiller`, the SDK's client: DistillationJobs and ModelAliases over the Kubernetes API (the sync
kubernetes client, imported lazily so `estimate` and the catalogs work offline). Together with the
operator's `k8s/` (async, inside kopf) it is one of the two places that talk to the API server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubedistill import dataset as ds
from kubedistill.api.models import API_VERSION, GROUP, VERSION, Stage
from kubedistill.catalog import Catalog, load_catalog
from kubedistill.errors import DistillerError, Invalid, NotFound, from_status
from kubedistill.sdk import offline
from kubedistill.sdk.mapping import (
    DATASET_KEY,
    DATASETS_URI_ENV,
    TERMINAL,
    alias_target,
    alias_view,
    artifacts_view,
    dataset_spec,
    job_body,
    job_id,
    rollback_patch,
    summary,
)
from kubedistill.sdk.offline import Dicts

if TYPE_CHECKING:
    from kubernetes import client as k8s

JOBS = "distillationjobs"
ALIASES = "modelaliases"


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
        self, name: str, dataset_id: str, teacher_model: str, student_model: str, **options: Any
    ) -> dict[str, Any]:
        """Submit a DistillationJob; returns {"id", "status", "phase", …}.

        `options` are `mapping.job_body`'s keywords, with the seed's defaults: num_prompts,
        n_samples, training_steps, bond_beta, bond_gamma, export_gguf, quantization_types, top_k,
        judge ("llm" | "majority" | "reference" | a judge dict), teacher_base_url,
        teacher_api_key_secret ("secret/key"), system_prompt, max_tokens, temperature,
        test_fraction, alias, min_eval_score, max_teacher_cost_usd, labels, spec_overrides (merged
        into the spec last).
        """
        body = job_body(name, self.resolve_dataset(dataset_id), teacher_model, student_model, **options)
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

    def events(self, id: str) -> Dicts:
        """The job's Kubernetes Events, oldest first: {type, reason, time, message}."""
        try:
            found = self._core.list_namespaced_event(
                self.namespace,
                field_selector=f"involvedObject.name={id},involvedObject.kind=DistillationJob",
            ).items
        except _api_exception():
            # Events are a courtesy of `describe`: without them the rest still shows.
            return []
        found.sort(key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
        return [
            {
                "type": e.type or "",
                "reason": e.reason or "",
                "time": (e.last_timestamp or e.metadata.creation_timestamp).isoformat(),
                "message": e.message or "",
            }
            for e in found
        ]

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

    def estimate(self, student_model: str, *args: Any, **options: Any) -> dict[str, Any]:
        """Teacher dollars and GPU minutes before anything runs; offline (`offline.estimate`)."""
        return offline.estimate(self.catalog, student_model, *args, **options)

    def teacher_models(self) -> Dicts:
        return offline.teacher_models(self.catalog)

    def student_models(self) -> Dicts:
        return offline.student_models(self.catalog)

    # ------------------------------------------------------------------------- aliases

    def register_model(
        self,
        id: str,
        adapter_path: str | None = None,
        gguf_path: str | None = None,
        *,
        base_model: str | None = None,
        distillation_job: str | None = None,
        provider: str | None = None,
        base_url: str | None = None,
        api_key_secret: str | None = None,
        canary_weight: int | None = None,
        fallback_provider: str | None = None,
    ) -> dict[str, Any]:
        """Create the ModelAlias `id`, or re-point it; the operator keeps the previous target in history.

        With the gateway on (the chart's default) the operator then serves it: `model=<id>` sent to the
        gateway reaches this target. `canary_weight` makes it the alias's canary (that percent of
        requests) and keeps the current primary; `fallback_provider` (e.g. the teacher) takes requests
        the target fails.
        """
        target = alias_target(
            adapter_path, gguf_path, base_model, distillation_job, provider, base_url, api_key_secret
        )
        # The alias's other settings (canary, fallback, server) stay as they are.
        spec: dict[str, Any] = dict((self._alias_or_none(id) or {}).get("spec") or {})
        if canary_weight is not None and "target" in spec:
            spec["canary"] = {**target, "weight": canary_weight}
        else:
            spec["target"] = target
        if fallback_provider:
            spec["fallback"] = {"provider": {"model": fallback_provider}}
        body = {
            "apiVersion": API_VERSION,
            "kind": "ModelAlias",
            "metadata": {"name": id, "namespace": self.namespace},
            "spec": spec,
        }
        return alias_view(self.apply(body))

    def _alias_or_none(self, id: str) -> dict[str, Any] | None:
        try:
            with _translated():
                found: dict[str, Any] = self._objects.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, ALIASES, id
                )
        except NotFound:
            return None
        return found

    def alias(self, id: str) -> dict[str, Any]:
        with _translated():
            obj = self._objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, ALIASES, id)
        return alias_view(obj)

    def rollback_alias(self, id: str) -> dict[str, Any]:
        """Restore the alias's previous serving state (the newest entry of status.history): its target, and
        its canary or none."""
        with _translated():
            obj = self._objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, ALIASES, id)
        history = (obj.get("status") or {}).get("history") or []
        if not history:
            raise NotFound(f"ModelAlias {id} has no previous target to roll back to")
        with _translated():
            patched = self._objects.patch_namespaced_custom_object(
                GROUP, VERSION, self.namespace, ALIASES, id, rollback_patch(obj["spec"], history[0])
            )
        return alias_view(patched)


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
