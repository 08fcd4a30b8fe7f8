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

The package: `mapping` (pure: seed keywords ↔ the CRD's fields, tested on its own) and `client`
(`Distiller`, the only part that talks to the API server).
"""

from __future__ import annotations

from kubedistill.api.models import GROUP
from kubedistill.errors import Conflict, DistillerError, Forbidden, Invalid, NotFound, Unauthorized
from kubedistill.sdk.client import Distiller
from kubedistill.sdk.mapping import (
    DISPLAY_NAME_ANNOTATION,
    TERMINAL,
    alias_target,
    alias_view,
    artifacts_view,
    coarse_status,
    dataset_spec,
    estimate_dict,
    job_body,
    job_id,
    summary,
)

__all__ = [
    "DISPLAY_NAME_ANNOTATION",
    "GROUP",
    "TERMINAL",
    "Conflict",
    "Distiller",
    "DistillerError",
    "Forbidden",
    "Invalid",
    "NotFound",
    "Unauthorized",
    "alias_target",
    "alias_view",
    "artifacts_view",
    "coarse_status",
    "dataset_spec",
    "estimate_dict",
    "job_body",
    "job_id",
    "summary",
]
