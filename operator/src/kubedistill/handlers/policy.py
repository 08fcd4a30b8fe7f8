"""The URI and image policy in the operator: resolve a namespace's scope, check a job or alias against it.

Runs before the operator reads anything of a job (progress, results) or starts a stage Job, so that a
cluster without the chart's admission policy still confines each namespace (domain.uri_policy).
"""

from __future__ import annotations

from kubedistill.api.models import DistillationJob
from kubedistill.builders import artifact_root
from kubedistill.domain.uri_policy import Policy, Violation, job_violations, resolve
from kubedistill.k8s import resources
from kubedistill.k8s.client import Kube
from kubedistill.settings import Settings

POLICY_VIOLATION = "PolicyViolation"


async def namespace_policy(kube: Kube, settings: Settings, namespace: str) -> tuple[Settings, Policy]:
    """The namespace's settings and policy; its labels are read only when a scope selects by label."""
    labels = await resources.namespace_labels(kube, namespace) if settings.uses_namespace_labels else {}
    return resolve(settings, namespace, labels)


def job_problems(job: DistillationJob, settings: Settings, policy: Policy) -> list[Violation]:
    try:
        root = artifact_root(job, settings)
    except ValueError:  # no storage configured at all: the stage Job reports it, nothing is written
        root = ""
    return job_violations(job, policy, root)
