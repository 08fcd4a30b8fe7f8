"""A DistillationJob from a YAML/JSON file, checked the way the API server would check it.

Used by `kubedistill run --local` and by the cluster CLI's `estimate -f`: errors name the field the
way the API server does (`spec.curation.topK: ...`), and `dataset.uri: file://rows.jsonl` (no third
slash) is a path relative to the job file.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubedistill.api.models import NAME_PATTERN, DistillationJob, DistillationJobSpec
from kubedistill.errors import error_lines


class JobInvalid(Exception):
    """The job file cannot be run: `lines` say why, one field per line."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def parse_job(text: str, source: str = "job") -> DistillationJob:
    """The DistillationJob in a YAML/JSON text; JobInvalid with field-level lines otherwise."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise JobInvalid([f"{source}: {where}{problem}"]) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "DistillationJob"]
    if len(jobs) != 1:
        kinds = [d.get("kind") if isinstance(d, dict) else type(d).__name__ for d in docs]
        raise JobInvalid([f"{source}: expected one DistillationJob, found {kinds or 'nothing'}"])
    try:
        job = DistillationJob.model_validate(jobs[0])
    except ValidationError as err:
        raise JobInvalid(error_lines(err)) from None
    if not re.match(NAME_PATTERN, job.metadata.name) or len(job.metadata.name) > 63:
        # The API server's words for an object name it refuses.
        raise JobInvalid(
            [
                f"metadata.name: Invalid value: {job.metadata.name!r}: a lowercase RFC 1123 subdomain must "
                "consist of lower case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character"
            ]
        )
    return job


def load_job(path: Path) -> DistillationJob:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise JobInvalid([f"{path}: {err.strerror}"]) from None
    return parse_job(text, str(path))


def resolve_dataset_uri(uri: str | None, base_dir: Path) -> str | None:
    """`file://rel/path` (no third slash) is relative to the job file; other URIs are kept."""
    if uri is None or not uri.startswith("file://") or uri.startswith("file:///"):
        return uri
    return (base_dir / uri.removeprefix("file://")).resolve().as_uri()


def with_dataset_path(spec: DistillationJobSpec, base_dir: Path) -> DistillationJobSpec:
    dataset = spec.dataset.model_copy(update={"uri": resolve_dataset_uri(spec.dataset.uri, base_dir)})
    return spec.model_copy(update={"dataset": dataset})
