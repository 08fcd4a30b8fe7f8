"""What a namespace may name: its storage scope, shared read-only prefixes, allowed stage images.

Pure, on (field path, value) pairs. The same rules run twice (docs/multi-team.md): at admission, in
the chart's ValidatingAdmissionPolicy (CEL), and in the operator before it reads anything or starts a
stage Job, so a cluster where the policy is missing or was removed is still safe. Messages name the
field and the value the user wrote, never data from a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from urllib.parse import urlparse

from kubedistill.api.models import STAGES, DistillationJob
from kubedistill.settings import Settings, StorageScope

# The fields of a ModelAlias spec that hold a target; absent ones are skipped, so new target-shaped
# fields only need adding here.
ALIAS_TARGET_FIELDS = ("target", "canary", "fallback")
_ALIAS_URIS = (("gguf_uri", "ggufURI"), ("adapter_uri", "adapterURI"))


class Access(StrEnum):
    READ = "read"  # a URI a stage reads: scope or shared read-only prefix
    MODEL = "model"  # a model id, or a URI read like READ
    WRITE = "write"  # where artifacts are written: the scope only


@dataclass(frozen=True)
class Policy:
    """The rules for one namespace. `scope` None: single-team operator, URIs unconfined."""

    scope: str | None
    shared_read: tuple[str, ...] = ()
    image_prefixes: tuple[str, ...] = ()
    allow_files: bool = False
    endpoint: str | None = None
    # Set when the namespace has no scope and the default is not allowed: everything is refused.
    refusal: str | None = None


@dataclass(frozen=True)
class Violation:
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def scope_for(settings: Settings, namespace: str, labels: Mapping[str, str]) -> StorageScope | None:
    """The namespace's own scope entry; the first match wins, as in the chart's bindings."""
    return next((s for s in settings.storage_scopes if s.matches(namespace, labels)), None)


def resolve(settings: Settings, namespace: str, labels: Mapping[str, str]) -> tuple[Settings, Policy]:
    """The settings stage Jobs of this namespace are built with (its bucket, prefix, Secret) and its policy."""
    images = settings.allowed_image_prefixes
    files = settings.file_uris_allowed
    shared = settings.shared_read_uris
    if not settings.storage_scopes:
        return settings, Policy(scope=None, shared_read=shared, image_prefixes=images, allow_files=files)
    scope = scope_for(settings, namespace, labels)
    if scope is not None:
        scoped = replace(
            settings,
            storage_bucket=scope.bucket,
            storage_prefix=scope.prefix,
            storage_secret=scope.secret,
            storage_endpoint=scope.endpoint or settings.storage_endpoint,
            service_account=scope.service_account or settings.service_account,
            artifact_root=None,
        )
        endpoint = scope.endpoint or settings.storage_endpoint
        return scoped, Policy(scope.root, shared, images, files, endpoint)
    if not settings.allow_default_scope or settings.storage_bucket is None:
        refusal = f"namespace {namespace} has no storage scope (the operator's storage.scopes)"
        return settings, Policy(scope=None, image_prefixes=images, refusal=refusal)
    # The default scope: the shared bucket, confined to this namespace's own prefix.
    prefix = "/".join(p for p in (settings.storage_prefix.strip("/"), namespace) if p)
    root = f"s3://{settings.storage_bucket}/{prefix}/"
    return settings, Policy(root, shared, images, files, settings.storage_endpoint)


# ---------------------------------------------------------------------------------- extractors


def job_uris(job: DistillationJob, artifact_root: str) -> list[tuple[str, str, Access]]:
    """Every URI a DistillationJob names, with its field path; the artifact root only when the spec moves it
    (an empty root: no storage configured at all, nothing is written)."""
    spec = job.spec
    found: list[tuple[str, str, Access]] = []
    if spec.dataset.uri is not None:
        found.append(("spec.dataset.uri", spec.dataset.uri, Access.READ))
    found.append(("spec.student.model", spec.student.model, Access.MODEL))
    if artifact_root and (spec.storage.bucket is not None or spec.storage.prefix is not None):
        field = "spec.storage.bucket" if spec.storage.bucket is not None else "spec.storage.prefix"
        namespace = job.metadata.namespace or "default"
        found.append((field, f"{artifact_root.rstrip('/')}/{namespace}/", Access.WRITE))
    return found


def alias_uris(spec: object) -> list[tuple[str, str, Access]]:
    """Every URI of a ModelAlias spec, walking each target-shaped field (one target or a list of them)."""
    found: list[tuple[str, str, Access]] = []
    for name in ALIAS_TARGET_FIELDS:
        value = getattr(spec, name, None)
        targets = list(value) if isinstance(value, list | tuple) else [value]
        for index, target in enumerate(targets):
            if target is None:
                continue
            path = f"spec.{name}[{index}]" if isinstance(value, list | tuple) else f"spec.{name}"
            for attr, key in _ALIAS_URIS:
                uri = getattr(target, attr, None)
                if isinstance(uri, str):
                    found.append((f"{path}.{key}", uri, Access.READ))
            model = getattr(target, "base_model", None)
            if isinstance(model, str):
                found.append((f"{path}.baseModel", model, Access.MODEL))
    return found


def job_images(job: DistillationJob) -> list[tuple[str, str]]:
    found = []
    for stage in STAGES:
        overrides = job.spec.resources.for_stage(stage)
        if overrides is not None and overrides.image:
            found.append((f"spec.resources.{stage.value}.image", overrides.image))
    return found


# ---------------------------------------------------------------------------------------- rules


def _is_file(value: str, access: Access) -> bool:
    scheme = urlparse(value).scheme
    if access is Access.MODEL:
        # A model id is a catalog or Hugging Face name; a path is read from the pod's filesystem.
        return scheme == "file" or value.startswith(("/", "."))
    return scheme in ("", "file")


def check_uri(field: str, value: str, access: Access, policy: Policy) -> Violation | None:
    if _is_file(value, access):
        if policy.allow_files:
            return None
        return Violation(field, f"{value} is a file on the pod's filesystem; file:// is for local mode only")
    scheme = urlparse(value).scheme
    if access is Access.MODEL and scheme != "s3":
        return None
    if scheme != "s3":
        return Violation(field, f"{value} is not an s3:// URI")
    if policy.scope is None:
        return None
    allowed = (policy.scope,) if access is Access.WRITE else (policy.scope, *policy.shared_read)
    if any(value.startswith(prefix) for prefix in allowed):
        return None
    shared = f" or the shared read-only {', '.join(policy.shared_read)}" if access is not Access.WRITE else ""
    return Violation(field, f"{value} is outside this namespace's storage scope {policy.scope}{shared}")


def check_image(field: str, image: str, policy: Policy) -> Violation | None:
    if any(image.startswith(prefix) for prefix in policy.image_prefixes):
        return None
    allowed = ", ".join(policy.image_prefixes) or "none"
    return Violation(field, f"image {image} is not from an allowed registry or prefix ({allowed})")


def check_uris(pairs: Iterable[tuple[str, str, Access]], policy: Policy) -> list[Violation]:
    found = [check_uri(field, value, access, policy) for field, value, access in pairs]
    return [v for v in found if v is not None]


def job_violations(job: DistillationJob, policy: Policy, artifact_root: str) -> list[Violation]:
    """Everything wrong with a job in its namespace; empty when it may run."""
    if policy.refusal is not None:
        return [Violation("metadata.namespace", policy.refusal)]
    found = check_uris(job_uris(job, artifact_root), policy)
    endpoint = job.spec.storage.endpoint
    if policy.scope is not None and endpoint is not None and endpoint != policy.endpoint:
        # The namespace's credentials must only be sent to the scope's own endpoint.
        found.append(
            Violation("spec.storage.endpoint", f"{endpoint} is not this namespace's storage endpoint")
        )
    images = (check_image(field, image, policy) for field, image in job_images(job))
    return found + [v for v in images if v is not None]


def alias_violations(spec: object, policy: Policy) -> list[Violation]:
    if policy.refusal is not None:
        return [Violation("metadata.namespace", policy.refusal)]
    found = check_uris(alias_uris(spec), policy)
    # A model server image of the team's choice would run where the operator puts the fetch credentials.
    image = getattr(getattr(spec, "server", None), "image", None)
    refused = check_image("spec.server.image", image, policy) if isinstance(image, str) else None
    return found if refused is None else [*found, refused]


def summary(violations: Iterable[Violation]) -> str:
    return "; ".join(str(v) for v in violations)
