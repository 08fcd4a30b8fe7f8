from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubedistill.domain import conditions as cond

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_new_condition_gets_transition_time() -> None:
    out = cond.set_condition([], cond.READY, "True", "StageRunning", "go", now=T0, generation=3)
    assert len(out) == 1
    assert out[0].last_transition_time == "2026-01-01T12:00:00Z"
    assert out[0].observed_generation == 3


def test_same_status_keeps_transition_time_but_updates_reason_and_message() -> None:
    first = cond.set_condition([], cond.READY, "True", "StageRunning", "generate", now=T0, generation=1)
    second = cond.set_condition(first, cond.READY, "True", "StageBackOff", "retrying", now=T1, generation=2)
    assert second[0].last_transition_time == first[0].last_transition_time
    assert (second[0].reason, second[0].message, second[0].observed_generation) == (
        "StageBackOff",
        "retrying",
        2,
    )


def test_flip_moves_transition_time() -> None:
    first = cond.set_condition([], cond.READY, "True", "StageRunning", "", now=T0, generation=1)
    second = cond.set_condition(first, cond.READY, "False", "Unschedulable", "no gpu", now=T1, generation=1)
    assert second[0].last_transition_time == "2026-01-01T12:05:00Z"


def test_one_condition_per_type_and_order_kept() -> None:
    out = cond.set_condition([], cond.READY, "True", "A", "", now=T0, generation=1)
    out = cond.set_condition(out, cond.SUSPENDED, "True", "Suspended", "", now=T0, generation=1)
    out = cond.set_condition(out, cond.READY, "False", "B", "", now=T1, generation=1)
    assert [c.type for c in out] == [cond.READY, cond.SUSPENDED]
    assert cond.is_true(out, cond.SUSPENDED) and not cond.is_true(out, cond.READY)


def test_clear_only_touches_conditions_that_were_reported() -> None:
    assert cond.clear_condition([], cond.SECRET_MISSING, "SecretsFound", "", now=T0, generation=1) == []
    out = cond.set_condition([], cond.SECRET_MISSING, "True", "SecretNotFound", "x", now=T0, generation=1)
    cleared = cond.clear_condition(out, cond.SECRET_MISSING, "SecretsFound", "ok", now=T1, generation=1)
    assert cleared[0].status == "False" and cleared[0].last_transition_time == "2026-01-01T12:05:00Z"


def test_time_round_trip() -> None:
    assert cond.parse_time(cond.rfc3339(T0)) == T0
    assert cond.parse_time(None) is None
