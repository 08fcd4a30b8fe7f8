"""`ModelAlias.spec.recording`: which of an alias's requests the gateway stores, and how redacted."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator

from kubedistill.api.models import Model, Name, Uri
from kubedistill.recorder import BUILTIN_REDACTORS

Redactor = Annotated[str, Field(min_length=1, max_length=512)]


def _default_redact() -> list[str]:
    return list(BUILTIN_REDACTORS)


class RecordingSpec(Model):
    enabled: bool = Field(default=False, description="Store this alias's requests and answers.")
    sample_rate: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of requests stored, chosen by a hash of the request id.",
    )
    destination: Annotated[str, Field(max_length=2048, pattern=r"^(s3|file)://.+")] | None = Field(
        default=None,
        description="s3:// prefix of the recorded objects; defaults to <operator bucket>/<prefix>/"
        "recordings/<namespace>/<alias>.",
    )
    endpoint: Uri | None = Field(
        default=None, description="S3 endpoint of the destination; defaults to the operator's."
    )
    credentials_secret_ref: Name | None = Field(
        default=None,
        description="Secret (in the alias's namespace) with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for a "
        "destination outside the operator's bucket; copied into the gateway's keys Secret.",
    )
    redact: list[Redactor] = Field(
        default_factory=_default_redact,
        max_length=64,
        description="What is replaced before anything is stored: built-ins email, phone and card "
        "(Luhn-checked), or Python regular expressions.",
    )
    max_prompt_chars: int = Field(
        default=32768, ge=1, le=1_048_576, description="Each stored message and answer is cut at this length."
    )

    @field_validator("redact")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        for i, pattern in enumerate(value):
            if pattern in BUILTIN_REDACTORS:
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact[{i}] is not a valid regular expression: {exc}") from None
        return value
