from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubedistill import doctor
from kubedistill.domain.deletion import FINALIZER, deletes_artifacts, has_finalizer, terminating_message
from kubedistill.settings import Settings

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def body(
    name: str,
    *,
    delete: bool | None = None,
    finalizers: list[str] | None = None,
    deleted: datetime | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "team", "uid": f"uid-{name}"}
    if finalizers is not None:
        meta["finalizers"] = finalizers
    if deleted is not None:
        meta["deletionTimestamp"] = deleted.strftime("%Y-%m-%dT%H:%M:%SZ")
    spec: dict[str, Any] = {
        "teacher": {"model": "openai/gpt-4o-mini"},
        "student": {"model": "qwen3-0.6b"},
        "dataset": {"prompts": ["hi"]},
    }
    if delete is not None:
        spec["storage"] = {"deleteOnJobDeletion": delete}
    return {
        "apiVersion": "kubedistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": meta,
        "spec": spec,
    }


def test_only_a_job_that_deletes_its_artifacts_needs_the_finalizer() -> None:
    assert deletes_artifacts(body("a", delete=True))
    assert not deletes_artifacts(body("b", delete=False))
    assert not deletes_artifacts(body("c"))
    assert has_finalizer(body("d", finalizers=["other", FINALIZER]))
    assert not has_finalizer(body("e", finalizers=["other"])) and not has_finalizer(body("f"))


def test_terminating_message_names_pods_first_and_caps_the_list() -> None:
    pods = [f"bot-train-1-{i}" for i in range(7)]
    message = terminating_message(["bot-train-1"], pods)
    assert message.startswith("7 stage pod(s) still terminating (bot-train-1-0, ")
    assert message.count("bot-train-1-") == 5 and "and 2 more" in message
    assert terminating_message(["bot-train-1"], []) == "1 stage Job(s) still being deleted (bot-train-1)"


def test_doctor_lists_held_jobs_with_what_the_finalizer_is_for() -> None:
    settings = Settings(artifact_root="file:///art")
    bodies = [
        body("stale", finalizers=[FINALIZER]),
        body("free"),
        body("cleans", delete=True, finalizers=[FINALIZER]),
        body("stuck", delete=True, finalizers=[FINALIZER], deleted=NOW - timedelta(minutes=5)),
        body("fresh", finalizers=[FINALIZER], deleted=NOW - timedelta(seconds=3)),
    ]
    held = {h.name: h for h in doctor.held_jobs(bodies, settings)}
    assert sorted(held) == ["cleans", "fresh", "stale", "stuck"]
    assert held["stuck"].artifacts == "file:///art/team/stuck/uid-stuck"
    assert doctor.diagnose(held["stale"], NOW).startswith("not needed (left by an older operator")
    assert doctor.diagnose(held["cleans"], NOW).startswith("spec.storage.deleteOnJobDeletion")
    assert doctor.diagnose(held["stuck"], NOW).startswith("STUCK: deleted 2026-12-03T11:55:00Z")
    assert doctor.diagnose(held["fresh"], NOW).startswith("being deleted for 3s;")


def test_releasing_says_which_artifacts_stay_and_why() -> None:
    settings = Settings(artifact_root="file:///art")
    gone, live, stale = doctor.held_jobs(  # sorted by name
        [
            body("live", delete=True, finalizers=[FINALIZER]),
            body("gone", delete=True, finalizers=[FINALIZER], deleted=NOW),
            body("stale", finalizers=[FINALIZER]),
        ],
        settings,
    )
    assert doctor.artifacts_plan(stale, delete_artifacts=True) is None
    # A job not being deleted keeps its artifacts: nobody will delete them when it is deleted later.
    assert doctor.artifacts_plan(live, delete_artifacts=True) == (
        "artifacts at file:///art/team/live/uid-live will stay when the job is deleted: "
        "no operator is left to delete them"
    )
    assert doctor.artifacts_plan(gone, delete_artifacts=True) is None  # they are deleted first
    assert "artifact deletion skipped" in (doctor.artifacts_plan(gone, delete_artifacts=False) or "")
    unknown = doctor.held_jobs([body("x", delete=True, finalizers=[FINALIZER])], Settings())[0]
    assert unknown.artifacts is None
    assert "unknown location" in (doctor.artifacts_plan(unknown, delete_artifacts=True) or "")
