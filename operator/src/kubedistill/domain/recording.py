"""Recording: what the gateway's recorder is told for one alias, and the alias's `Recording` condition.

Pure: `plan_recording` turns `spec.recording` and the operator's settings into a recorder `Rule`
(what is stored where, with which env-referenced keys), the key values the operator must copy into
the gateway's keys Secret, and the condition to report. A destination outside the operator's bucket
needs its own credentials Secret; without one nothing is recorded and the condition says which field
to set. The alias keeps serving whatever its recording says.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kubedistill.api.recording import RecordingSpec
from kubedistill.api.stage import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from kubedistill.domain.conditions import Status
from kubedistill.recorder import ENV_REF, Rule
from kubedistill.settings import Settings
from kubedistill.traffic import recordings_prefix

RECORDING = "Recording"
# The operator's own storage keys, from its storage Secret in the gateway's namespace.
OPERATOR_KEY_ENV = ("KD_RECORDING_AWS_ACCESS_KEY_ID", "KD_RECORDING_AWS_SECRET_ACCESS_KEY")


class RecordingReason:
    RECORDING = "Recording"
    DISABLED = "Disabled"
    NO_DESTINATION = "RecordingNoDestination"
    CREDENTIALS_MISSING = "RecordingCredentialsMissing"
    SECRET_NOT_FOUND = "RecordingSecretNotFound"
    NO_GATEWAY = "RecordingNoGateway"


@dataclass(frozen=True)
class KeyCopy:
    """One value the operator copies from a Secret of the alias's namespace into the gateway's keys Secret."""

    namespace: str
    secret: str
    key: str
    env: str


@dataclass(frozen=True)
class RecordingPlan:
    rule: Rule | None
    status: Status
    reason: str
    message: str
    copies: tuple[KeyCopy, ...] = ()
    uses_operator_keys: bool = False


def _bucket(uri: str) -> str | None:
    return uri.removeprefix("s3://").split("/", 1)[0] if uri.startswith("s3://") else None


def copied_key_env(namespace: str, secret: str, key: str) -> str:
    digest = hashlib.sha256(f"{namespace}/{secret}/{key}".encode()).hexdigest()[:12].upper()
    return f"KD_RECORDING_KEY_{digest}"


def plan_recording(
    namespace: str, alias: str, spec: RecordingSpec | None, settings: Settings, root: str | None
) -> RecordingPlan | None:
    """What to record for one alias (None: the alias has no recording section, so no condition).
    `root` is the operator's storage root (s3://bucket/prefix or file://…), None when it has none."""
    if spec is None:
        return None
    if not spec.enabled:
        return RecordingPlan(None, "False", RecordingReason.DISABLED, "spec.recording.enabled is false")
    destination = spec.destination or (recordings_prefix(root, namespace, alias) if root else None)
    if destination is None:
        return RecordingPlan(
            None,
            "False",
            RecordingReason.NO_DESTINATION,
            "spec.recording.destination is not set and the operator has no storage bucket to default to",
        )
    bucket = _bucket(destination)
    endpoint = spec.endpoint or settings.storage_endpoint
    copies: tuple[KeyCopy, ...] = ()
    access = secret = None
    operator_keys = False
    if spec.credentials_secret_ref is not None:
        ref = spec.credentials_secret_ref
        copies = tuple(
            KeyCopy(namespace, ref, key, copied_key_env(namespace, ref, key))
            for key in (S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV)
        )
        access, secret = (ENV_REF + c.env for c in copies)
    elif bucket is not None and bucket != settings.storage_bucket:
        return RecordingPlan(
            None,
            "False",
            RecordingReason.CREDENTIALS_MISSING,
            f"spec.recording.destination {destination} is outside the operator's bucket: set "
            "spec.recording.credentialsSecretRef to a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        )
    elif bucket is not None and settings.storage_secret:
        access, secret = (ENV_REF + env for env in OPERATOR_KEY_ENV)
        operator_keys = True
    rule = Rule(
        namespace=namespace,
        alias=alias,
        destination=destination,
        sample_rate=spec.sample_rate,
        redact=tuple(spec.redact),
        max_prompt_chars=spec.max_prompt_chars,
        endpoint=endpoint if bucket is not None else None,
        access_key=access,
        secret_key=secret,
    )
    redacting = ", ".join(spec.redact) or "nothing"
    message = f"{spec.sample_rate:g} of requests stored under {destination}, redacting {redacting}"
    return RecordingPlan(rule, "True", RecordingReason.RECORDING, message, copies, operator_keys)


def secret_not_found(plan: RecordingPlan, secret: str) -> RecordingPlan:
    """The plan once the credentials Secret turned out not to exist: nothing recorded, and why."""
    return RecordingPlan(
        None,
        "False",
        RecordingReason.SECRET_NOT_FOUND,
        f"spec.recording.credentialsSecretRef: Secret {secret} (with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY) not found",
    )


def without_gateway() -> RecordingPlan:
    return RecordingPlan(
        None,
        "False",
        RecordingReason.NO_GATEWAY,
        "spec.recording needs the operator's gateway, which is off (chart value gateway.enabled)",
    )
