"""`kubedistill chat` and the alias views: one request to a real OpenAI-compatible server; tables."""

from __future__ import annotations

import pytest

from kubedistill.cli.alias import alias_table
from kubedistill.errors import DistillerError
from kubedistill.sdk.chat import chat
from kubedistill.sdk.mapping import alias_target, alias_view, rollback_patch
from kubedistill_testing.fake_teacher import FakeTeacher


def test_chat_sends_the_alias_as_model_and_the_key_as_bearer() -> None:
    with FakeTeacher(answers={"hello?": "the student says hi"}, api_key="sk-gw", models=("smart",)) as server:
        reply = chat(server.base_url, "smart", "hello?", api_key="sk-gw")
        assert reply.text == "the student says hi" and reply.seconds > 0
        with pytest.raises(DistillerError, match="HTTP 401"):
            chat(server.base_url, "smart", "hello?", api_key="wrong")
    with pytest.raises(DistillerError, match="cannot reach"):
        chat(server.base_url, "smart", "hello?", timeout=2)


def test_provider_targets_and_the_served_view() -> None:
    assert alias_target(None, None, None, None, "openai/gpt-4o", "http://t/v1", "oai/key") == {
        "provider": {
            "model": "openai/gpt-4o",
            "baseURL": "http://t/v1",
            "apiKeySecretRef": {"name": "oai", "key": "key"},
        }
    }
    view = alias_view(
        {
            "metadata": {"name": "smart"},
            "spec": {"target": {"distillationJob": "bot"}, "canary": {"ggufURI": "s3://c", "weight": 20}},
            "status": {
                "endpoint": {
                    "url": "http://kubedistill-gateway.kd.svc.cluster.local:4000/v1",
                    "model": "smart",
                },
                "served": [
                    {
                        "role": "primary",
                        "weight": 80,
                        "readyReplicas": 1,
                        "deploymentId": "ns/smart-a",
                        "target": {},
                    },
                    {
                        "role": "canary",
                        "weight": 20,
                        "readyReplicas": 2,
                        "deploymentId": "ns/smart-b",
                        "target": {},
                    },
                ],
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Serving", "message": "ok"},
                    {"type": "Progressing", "status": "False", "reason": "Complete", "message": "done"},
                ],
                "history": [
                    {
                        "target": {"ggufURI": "s3://a"},
                        "canary": {"ggufURI": "s3://b", "weight": 5},
                        "replacedAt": "2026-12-03T10:00:00Z",
                    },
                    {"target": {"ggufURI": "s3://a"}, "replacedAt": "2026-12-02T10:00:00Z"},
                ],
            },
        }
    )
    assert view["endpoint"]["model"] == "smart" and view["canary"]["weight"] == 20
    assert [(s["role"], s["weight"]) for s in view["served"]] == [("primary", 80), ("canary", 20)]
    rows = {str(r[0]): str(r[1]) for r in zip(*(c._cells for c in alias_table(view).columns), strict=True)}
    assert rows["served"] == "primary 80% → ns/smart-a (1 ready); canary 20% → ns/smart-b (2 ready)"
    assert rows["endpoint"].endswith("model=smart") and rows["progressing"] == "False Complete: done"
    assert rows["history"] == (
        '{"ggufURI": "s3://a"} + canary {"ggufURI": "s3://b", "weight": 5}; {"ggufURI": "s3://a"}'
    )
    assert view["history"][1] == {
        "target": {"ggufURI": "s3://a"},
        "canary": None,
        "replaced_at": "2026-12-02T10:00:00Z",
    }


def test_a_rollback_patch_restores_the_target_and_the_canary_or_removes_it() -> None:
    spec = {
        "target": {"distillationJob": "v3", "quantization": "q8_0"},
        "canary": {"ggufURI": "s3://c", "weight": 9},
    }
    with_canary = {"target": {"ggufURI": "s3://a"}, "canary": {"distillationJob": "v2", "weight": 20}}
    assert rollback_patch(spec, with_canary) == {
        "spec": {
            # Merge-patch nulls remove what the restored target and canary lack.
            "target": {"distillationJob": None, "quantization": None, "ggufURI": "s3://a"},
            "canary": {"ggufURI": None, "weight": 20, "distillationJob": "v2"},
        }
    }
    assert rollback_patch(spec, {"target": {"ggufURI": "s3://a"}})["spec"]["canary"] is None
