"""The Distiller SDK against the real test control plane with the operator running (fake stage pods):
create → wait → artifacts → register_model → the alias points at the student; errors are typed and carry
the API server's message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sdk_cli_support import ROWS, operator_process, wait_until

from kubedistill import Distiller
from kubedistill.errors import Conflict, Invalid, NotFound
from kubedistill_testing.kubelet import LocalKubelet

pytestmark = pytest.mark.cluster


@pytest.fixture
def distiller(
    control_plane: Path, namespace: str, kubelet: LocalKubelet, tmp_path: Path
) -> Iterator[Distiller]:
    with (
        operator_process(control_plane, namespace, tmp_path, kubelet, KUBEDISTILL_FAKE_SCORE="0.8"),
        Distiller(namespace=namespace, kubeconfig=control_plane) as d,
    ):
        yield d


def test_create_wait_artifacts_register_model(distiller: Distiller) -> None:
    d = distiller
    assert d.create_dataset("support-tickets", ROWS) == {"id": "support-tickets", "rows": 3}
    job = d.create(
        name="Ticket triage v1",
        dataset_id="support-tickets",
        teacher_model="openai/gpt-4o-mini",
        student_model="qwen3-0.6b",
        num_prompts=3,
        n_samples=2,
        training_steps=2,
        judge="majority",
        top_k=1,
    )
    assert job["id"] == "ticket-triage-v1" and job["name"] == "Ticket triage v1"
    assert job["status"] == "pending"
    spec = d.raw(job["id"])["spec"]
    assert spec["dataset"] == {
        "configMapRef": {"name": "support-tickets", "key": "dataset.jsonl"},
        "numPrompts": 3,
        "testFraction": 0.1,
    }

    updates: list[dict[str, Any]] = []
    final = d.wait(job["id"], on_update=updates.append, timeout=120)
    assert final["status"] == "succeeded" and final["phase"] == "Succeeded", final
    assert updates[-1]["status"] == "succeeded"
    assert {"running"} <= {u["status"] for u in updates}
    assert {"status", "phase"} <= set(updates[0])

    arts = d.artifacts(job["id"])
    assert set(arts["gguf_paths"]) == {"q4_k_m", "q8_0"}
    assert arts["adapter_path"] and arts["adapter_path"].startswith("file://")
    assert arts["metrics"]["teacher_cost_total"] is not None
    assert (
        arts["metrics"]["student_loss_final"] is not None and arts["metrics"]["training_time_sec"] is not None
    )

    registered = d.register_model(
        id="smart",
        adapter_path=arts["adapter_path"],
        gguf_path=arts["gguf_paths"]["q4_k_m"],
        base_model="qwen3-0.6b",
    )
    assert registered["target"]["ggufURI"] == arts["gguf_paths"]["q4_k_m"]
    alias = wait_until(lambda: (a := d.alias("smart"))["ready"] and a, "alias smart to resolve")
    assert alias["gguf_path"] == arts["gguf_paths"]["q4_k_m"] and alias["model"] == "qwen3-0.6b"

    # Re-pointing keeps the previous target; rollback returns to it.
    d.register_model(id="smart", distillation_job=job["id"])
    repointed = wait_until(lambda: (a := d.alias("smart"))["history"] and a, "alias history")
    assert repointed["history"][0]["target"]["ggufURI"] == arts["gguf_paths"]["q4_k_m"]
    assert d.rollback_alias("smart")["target"]["ggufURI"] == arts["gguf_paths"]["q4_k_m"]

    assert [j["id"] for j in d.list()] == [job["id"]] and d.get(job["id"])["status"] == "succeeded"


def test_errors_are_typed_with_the_servers_message(distiller: Distiller) -> None:
    d = distiller
    with pytest.raises(NotFound, match='"nope" not found'):
        d.get("nope")
    with pytest.raises(NotFound):
        d.wait("nope", timeout=5)
    with pytest.raises(NotFound, match="no ConfigMap of that name"):
        d.create(
            name="x", dataset_id="missing-dataset", teacher_model="openai/gpt-4o", student_model="qwen3-0.6b"
        )
    d.create_dataset("rows", ROWS)
    with pytest.raises(Invalid, match=r"spec\.curation\.topK"):
        d.create(name="bad", dataset_id="rows", teacher_model="t", student_model="s", n_samples=2, top_k=3)
    job = d.create(
        name="once",
        dataset_id="rows",
        teacher_model="openai/gpt-4o",
        student_model="qwen3-0.6b",
        judge="majority",
    )
    with pytest.raises(Conflict, match="already exists"):
        d.create(name="once", dataset_id="rows", teacher_model="openai/gpt-4o", student_model="qwen3-0.6b")
    assert d.cancel(job["id"])["id"] == "once" and d.raw("once")["spec"]["suspend"] is True
    d.delete("once")
    with pytest.raises(NotFound):
        d.delete("once")
