"""The swap, pure: new server Ready → routed → gateway rolled out → old server deleted; failures keep the old."""

from __future__ import annotations

from typing import Any

from kubedistill.api.alias import ModelAlias
from kubedistill.api.models import DistillationJob, Phase
from kubedistill.builders.model_server import GgufSource, server_name, server_version
from kubedistill.domain.serving import (
    Provider,
    Resolution,
    ServerState,
    Unresolved,
    gateway_routes,
    name_owners,
    plan_serving,
    resolve_target,
)
from kubedistill.settings import Settings

SETTINGS = Settings(gateway_enabled=True, storage_endpoint="http://s3", storage_secret="op-s3")
OLD, NEW = "s3://b/old.gguf", "s3://b/new.gguf"


def alias(spec: dict[str, Any], served: list[dict[str, Any]] | None = None) -> ModelAlias:
    body: dict[str, Any] = {"metadata": {"name": "smart", "namespace": "team", "uid": "u"}, "spec": spec}
    if served is not None:
        body["status"] = {"served": served}
    return ModelAlias.model_validate(body)


def name_of(uri: str) -> str:
    return server_name(
        "smart",
        server_version(
            GgufSource(uri, "http://s3", "op-s3"), alias_for(uri).spec.server, SETTINGS.server_image
        ),
    )


def alias_for(uri: str) -> ModelAlias:
    return alias({"target": {"ggufURI": uri}})


def served(uri: str, role: str = "primary", weight: int = 100) -> dict[str, Any]:
    name = name_of(uri)
    return {
        "role": role,
        "target": {"ggufURI": uri},
        "weight": weight,
        "server": name,
        "readyReplicas": 1,
        "deploymentId": f"team/{name}",
    }


def resolutions(a: ModelAlias) -> dict[Any, Resolution]:
    out: dict[Any, Resolution] = {"primary": resolve_target(a.spec.target, None, SETTINGS)}
    if a.spec.canary is not None:
        out["canary"] = resolve_target(a.spec.canary, None, SETTINGS)
    if a.spec.fallback is not None:
        out["fallback"] = resolve_target(a.spec.fallback, None, SETTINGS)
    return out


def test_first_serve_creates_then_routes_then_is_ready() -> None:
    a = alias_for(OLD)
    plan = plan_serving(a, resolutions(a), {}, frozenset(), SETTINGS)
    assert [m["kind"] for m in plan.create] == ["Deployment", "Service"] and plan.served == []
    assert plan.ready[0] is False and plan.progressing[:2] == (True, "WaitingForServer")

    servers = {name_of(OLD): ServerState(ready_replicas=1)}
    plan = plan_serving(a, resolutions(a), servers, frozenset(), SETTINGS)
    assert plan.create == [] and [s.server for s in plan.served] == [name_of(OLD)]
    assert plan.ready[:2] == (False, "WaitingForGateway") and plan.progressing[:2] == (
        True,
        "WaitingForGateway",
    )

    routed = alias({"target": {"ggufURI": OLD}}, [served(OLD)])
    plan = plan_serving(routed, resolutions(routed), servers, frozenset({f"team/{name_of(OLD)}"}), SETTINGS)
    assert plan.ready[:2] == (True, "Serving") and plan.progressing[:2] == (False, "Complete")


def test_repoint_keeps_the_old_server_until_no_gateway_pod_routes_to_it() -> None:
    old, new = name_of(OLD), name_of(NEW)
    a = alias({"target": {"ggufURI": NEW}}, [served(OLD)])
    rolled_old = frozenset({f"team/{old}"})
    # New server not there yet: created, old one still routed, alias still Ready.
    plan = plan_serving(a, resolutions(a), {old: ServerState(1)}, rolled_old, SETTINGS)
    assert plan.create and [s.server for s in plan.served] == [old] and plan.delete == []
    assert plan.ready[0] is True and plan.progressing[:2] == (True, "WaitingForServer")
    # New server Ready: routed; the gateway still runs the old config, so the old server stays.
    both = {old: ServerState(1), new: ServerState(1)}
    plan = plan_serving(a, resolutions(a), both, rolled_old, SETTINGS)
    assert [s.server for s in plan.served] == [new] and plan.delete == []
    assert plan.progressing[:2] == (True, "WaitingForGateway")
    # Mid-rollout (None): nothing is deleted.
    moved = alias({"target": {"ggufURI": NEW}}, [served(NEW)])
    assert plan_serving(moved, resolutions(moved), both, None, SETTINGS).delete == []
    # Every gateway pod runs the new config: the old server goes.
    plan = plan_serving(moved, resolutions(moved), both, frozenset({f"team/{new}"}), SETTINGS)
    assert plan.delete == [old] and plan.ready[0] is True and plan.progressing[0] is True
    plan = plan_serving(
        moved, resolutions(moved), {new: ServerState(1)}, frozenset({f"team/{new}"}), SETTINGS
    )
    assert plan.progressing[:2] == (False, "Complete")


def test_a_new_server_that_never_gets_ready_leaves_the_old_one_serving() -> None:
    old, new = name_of(OLD), name_of(NEW)
    a = alias({"target": {"ggufURI": NEW}}, [served(OLD)])
    failing = ServerState(0, "FetchFailed", "fetch: s3://b/new.gguf does not exist")
    plan = plan_serving(
        a, resolutions(a), {old: ServerState(1), new: failing}, frozenset({f"team/{old}"}), SETTINGS
    )
    assert [s.server for s in plan.served] == [old] and plan.delete == []
    assert plan.ready[0] is True
    assert plan.progressing[0] is False and plan.progressing[1] == "FetchFailed"
    assert "s3://b/new.gguf does not exist" in plan.progressing[2]


def test_bad_reference_keeps_serving_and_says_why() -> None:
    a = alias({"target": {"distillationJob": "nope"}}, [served(OLD)])
    res = {"primary": resolve_target(a.spec.target, None, SETTINGS)}
    plan = plan_serving(a, res, {name_of(OLD): ServerState(1)}, frozenset({f"team/{name_of(OLD)}"}), SETTINGS)
    assert [s.server for s in plan.served] == [name_of(OLD)] and plan.ready[0] is True
    assert plan.progressing[:2] == (False, "JobNotFound") and "nope" in plan.progressing[2]
    fresh = alias({"target": {"distillationJob": "nope"}})
    plan = plan_serving(fresh, res, {}, frozenset(), SETTINGS)
    assert plan.ready[:2] == (False, "JobNotFound")


def test_canary_weights_and_provider_fallback() -> None:
    spec = {
        "target": {"ggufURI": OLD},
        "canary": {"ggufURI": NEW, "weight": 20},
        "fallback": {"provider": {"model": "openai/gpt-4o", "apiKeySecretRef": {"name": "oai", "key": "k"}}},
    }
    a = alias(spec)
    servers = {name_of(OLD): ServerState(2), name_of(NEW): ServerState(1)}
    plan = plan_serving(a, resolutions(a), servers, frozenset(), SETTINGS)
    by_role = {s.role: s for s in plan.served}
    assert (by_role["primary"].weight, by_role["canary"].weight, by_role["fallback"].weight) == (80, 20, 0)
    assert by_role["primary"].ready_replicas == 2 and by_role["fallback"].server is None
    routed = alias(spec, [s.to_k8s() for s in plan.served])
    routes = gateway_routes(routed, SETTINGS, {("oai", "k"): "KD_PROVIDER_KEY_1"})
    fallback = next(r for r in routes if r.role == "fallback")
    assert (fallback.model, fallback.api_key_env, fallback.api_base) == (
        "openai/gpt-4o",
        "KD_PROVIDER_KEY_1",
        None,
    )
    primary = next(r for r in routes if r.role == "primary")
    assert (
        primary.model == "openai/smart"
        and primary.api_base == f"http://{name_of(OLD)}.team.svc.cluster.local:8080/v1"
    )
    # The canary not Ready yet: the primary takes everything meanwhile.
    plan = plan_serving(
        a, resolutions(a), {name_of(OLD): ServerState(1), name_of(NEW): ServerState(0)}, frozenset(), SETTINGS
    )
    assert [(s.role, s.weight) for s in plan.served] == [("primary", 100), ("fallback", 0)]


def test_a_provider_target_routes_at_once() -> None:
    a = alias({"target": {"provider": {"model": "openai/gpt-4o", "baseURL": "http://teacher/v1"}}})
    res = resolutions(a)
    assert res["primary"] == Provider("openai/gpt-4o", "http://teacher/v1", None)
    plan = plan_serving(a, res, {}, frozenset(), SETTINGS)
    assert plan.create == [] and plan.served[0].deployment_id.startswith("team/smart/primary-provider-")


def job(phase: Phase, ggufs: dict[str, str] | None, storage: dict[str, Any] | None = None) -> DistillationJob:
    return DistillationJob.model_validate(
        {
            "metadata": {"name": "bot"},
            "spec": {
                "teacher": {"model": "t"},
                "student": {"model": "s"},
                "dataset": {"prompts": ["a"]},
                "storage": storage or {},
            },
            "status": {"phase": phase.value, "artifacts": {"ggufURIs": ggufs} if ggufs else {}},
        }
    )


def test_resolve_target_reasons_and_storage() -> None:
    target = alias({"target": {"distillationJob": "bot"}}).spec.target
    assert resolve_target(target, None, SETTINGS) == Unresolved(
        "JobNotFound", "DistillationJob bot not found"
    )
    assert isinstance(failed := resolve_target(target, job(Phase.FAILED, None), SETTINGS), Unresolved)
    assert failed.reason == "JobFailed"
    assert resolve_target(target, job(Phase.TRAINING, None), SETTINGS).reason == "JobNotSucceeded"  # type: ignore[union-attr]
    missing = resolve_target(target, job(Phase.SUCCEEDED, {"q8_0": "s3://x"}), SETTINGS)
    assert isinstance(missing, Unresolved) and missing.reason == "ArtifactMissing"
    own = job(
        Phase.SUCCEEDED,
        {"q4_k_m": "s3://j/m.gguf"},
        {"endpoint": "http://minio", "credentialsSecretRef": "s"},
    )
    assert resolve_target(target, own, SETTINGS) == GgufSource("s3://j/m.gguf", "http://minio", "s")
    adapter = alias({"target": {"adapterURI": "s3://a", "baseModel": "m"}}).spec.target
    assert resolve_target(adapter, None, SETTINGS).reason == "NotServable"  # type: ignore[union-attr]


def test_the_oldest_alias_owns_a_model_name() -> None:
    def a(ns: str, created: str) -> ModelAlias:
        return ModelAlias.model_validate(
            {
                "metadata": {"name": "smart", "namespace": ns, "creationTimestamp": created},
                "spec": {"target": {"ggufURI": "s3://m"}},
            }
        )

    owners = name_owners([a("b", "2026-01-02T00:00:00Z"), a("a", "2026-01-03T00:00:00Z")])
    assert owners == {"smart": ("b", "smart")}


def _pod(version: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"labels": {"kubedistill.io/model-version": version}}, "status": status}


def _deployment(name: str, version: str, ready: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubedistill.io/model-version": version}},
        "status": {"readyReplicas": ready},
    }


def test_server_states_carry_the_pods_own_words() -> None:
    from kubedistill.k8s.serving import server_states

    fetch_crash = _pod(
        "v1",
        {
            "initContainerStatuses": [
                {
                    "name": "fetch",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
                    "lastState": {"terminated": {"exitCode": 1, "message": "s3://b/x.gguf does not exist"}},
                }
            ]
        },
    )
    unschedulable = _pod(
        "v2",
        {"conditions": [{"type": "PodScheduled", "reason": "Unschedulable", "message": "0/1 nodes: gpu"}]},
    )
    loading = _pod(
        "v3", {"containerStatuses": [{"name": "server", "state": {"running": {}}, "ready": False}]}
    )
    states = server_states(
        [
            _deployment("s-v1", "v1", 0),
            _deployment("s-v2", "v2", 0),
            _deployment("s-v3", "v3", 0),
            _deployment("s-v4", "v4", 2),
        ],
        [fetch_crash, unschedulable, loading],
    )
    assert states["s-v1"] == ServerState(0, "FetchFailed", "fetch: s3://b/x.gguf does not exist")
    assert states["s-v2"] == ServerState(0, "Unschedulable", "0/1 nodes: gpu")
    assert states["s-v3"] == ServerState(0, None, None)  # still loading: wait
    assert states["s-v4"] == ServerState(2, None, None)
