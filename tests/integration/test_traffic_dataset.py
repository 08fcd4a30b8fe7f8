"""dataset.fromTraffic on the real S3 server: objects written by the recorder's own S3 writer, read by
the real estimate and generate stages and by `kubedistill dataset from-traffic`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from data_stage_helpers import KEY, invocation, priced_catalog, result, run_stage, spec
from typer.testing import CliRunner

from kubedistill import recorder, store
from kubedistill.cli import app
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.s3 import RcloneS3

PREFIX = "s3://artifacts/kubedistill/recordings/team/smart"
EMAIL = "jane.doe@example.com"


@pytest.fixture(scope="module")
def s3() -> Iterator[RcloneS3]:
    with RcloneS3() as server:
        server.create_bucket("artifacts")
        yield server


def prompts() -> list[str]:
    """40 requests: 25 distinct prompts, 15 repeats (some differing only in case and spacing), 10 with
    an e-mail address."""
    distinct = [f"Question {i}: how do I reset my password?" for i in range(15)]
    distinct += [f"Please email {EMAIL} about order {i}" for i in range(10)]
    repeats = [distinct[i].upper() for i in range(5)] + [f"  {p}  " for p in distinct[5:15]]
    return distinct + repeats


def record_all(s3: RcloneS3, texts: list[str], start: datetime, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each text as one recorded request, put by the recorder's writer with env-referenced keys."""
    monkeypatch.setenv("REC_KEY_ID", s3.access_key)
    monkeypatch.setenv("REC_SECRET", s3.secret_key)
    rule = recorder.Rule(
        namespace="team",
        alias="smart",
        destination=PREFIX,
        endpoint=s3.endpoint,
        access_key="os.environ/REC_KEY_ID",
        secret_key="os.environ/REC_SECRET",
    )
    writer = recorder._Writer()
    for i, text in enumerate(texts):
        when = start + timedelta(seconds=i)
        payload = {
            "id": f"req-{i}",
            "startTime": when.timestamp(),
            "model": "teacher-model",
            "messages": [
                {"role": "system", "content": "You are support."},
                {"role": "user", "content": text},
            ],
            "response": {"choices": [{"message": {"content": f"Sure, I wrote to {EMAIL}."}}]},
        }
        record = recorder.build_record(payload, rule)
        body = json.dumps(record).encode()
        writer.put(rule, recorder.record_key(PREFIX, when, f"req-{i}"), body)


def traffic_spec(until: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "alias": "smart",
        "since": "1h",
        "until": until.isoformat().replace("+00:00", "Z"),
        "uri": PREFIX,
        **extra,
    }


@pytest.fixture(scope="module")
def recorded(s3: RcloneS3) -> datetime:
    """The recorded window's end: 40 requests and one malformed object in the hour before it."""
    start = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env().items():
            mp.setenv(key, value)
        record_all(s3, prompts(), start, mp)
        store.write_text(recorder.record_key(PREFIX, start + timedelta(minutes=5), "broken"), '{"kind": ')
    return start + timedelta(minutes=30)


def test_estimate_and_generate_train_on_the_deduplicated_redacted_prompts(
    s3: RcloneS3, recorded: datetime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    job = spec(dataset={"fromTraffic": traffic_spec(recorded), "testFraction": 0.2})
    base = "s3://artifacts/runs/traffic"
    with FakeTeacher(api_key=KEY) as fake:
        env = {
            **s3.env(),
            "KUBEDISTILL_CATALOG_DIR": str(priced_catalog(tmp_path / "catalog", fake.base_url)),
            "KUBEDISTILL_TEACHER_API_KEY": KEY,
        }
        estimate_inv = invocation(base, job, "estimate")
        run = run_stage(tmp_path, estimate_inv, env)
        assert run.returncode == 0, run.output
        estimate = result(estimate_inv)["estimate"]
        assert estimate["prompts"] == 25
        assert estimate["traffic"] == {
            "found": 41,
            "kept": 25,
            "deduplicated": 15,
            "rejected": 1,
            "overMaxRows": 0,
            "since": "2026-12-03T08:30:00Z",
            "until": "2026-12-03T09:30:00Z",
        }
        generate_inv = invocation(base, job, "generate")
        run = run_stage(tmp_path, generate_inv, env)
        assert run.returncode == 0, run.output
    res = result(generate_inv)
    assert "25 kept, 15 deduplicated, 1 rejected" in res["message"]
    rows = store.read_jsonl(f"{base}/generate/dataset/train.jsonl") + store.read_jsonl(
        f"{base}/generate/dataset/test.jsonl"
    )
    assert len(rows) == 25 and len(fake.calls) == 25
    assert all(r["system"] == "You are support." and r["reference"] for r in rows)
    assert sum("[EMAIL]" in r["messages"][-1]["content"] for r in rows) == 10
    rejected = store.read_jsonl(f"{base}/generate/dataset/traffic-rejected.jsonl")
    assert [r["reason"].split(" (")[0] for r in rejected] == ["not valid JSON"]
    for uri in store.list_uris("s3://artifacts/"):
        assert EMAIL.encode() not in store.read_bytes(uri), uri


def test_a_window_without_traffic_fails_the_estimate_clearly(
    s3: RcloneS3, recorded: datetime, tmp_path: Path
) -> None:
    job = spec(dataset={"fromTraffic": traffic_spec(recorded + timedelta(days=3))})
    inv = invocation("s3://artifacts/runs/empty", job, "estimate")
    catalog = priced_catalog(tmp_path / "catalog", "http://127.0.0.1:9/v1")
    run = run_stage(tmp_path, inv, {**s3.env(), "KUBEDISTILL_CATALOG_DIR": str(catalog)})
    assert run.returncode != 0
    assert run.termination is not None and run.termination["reason"] == "NoTraffic"
    assert run.termination["message"] == (
        "no recorded requests of alias smart from 2026-12-06T08:30:00Z to 2026-12-06T09:30:00Z under "
        + PREFIX
    )


def test_the_cli_writes_the_same_rows_offline(
    s3: RcloneS3, recorded: datetime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBEDISTILL_STORAGE_BUCKET", "artifacts")
    out = tmp_path / "rows.jsonl"
    until = recorded.isoformat().replace("+00:00", "Z")
    args = [
        "dataset",
        "from-traffic",
        "smart",
        "-n",
        "team",
        "--since",
        "1h",
        "--until",
        until,
        "-o",
        str(out),
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and len({r["id"] for r in rows}) == 25
    assert "25 kept, 15 deduplicated, 1 rejected" in done.output and EMAIL not in out.read_text()
    done = CliRunner().invoke(app, [*args, "--no-dedupe", "--system-prompt", "drop", "--max-rows", "30"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and not any("system" in r for r in rows)
