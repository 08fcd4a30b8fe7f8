"""The recorder inside the real LiteLLM proxy: the operator's rendered config and ConfigMap files on
loopback, the fake teacher behind it, the real S3 server as the destination.

200 requests to a recording alias (duplicates, e-mail addresses) land as 200 redacted objects, and
`fromTraffic` reads back exactly the distinct prompts; an alias without recording stores nothing; a
sampled alias stores exactly the requests its rate picks by LiteLLM's call id; a destination the
keys cannot write to fails only the recording, with a clear log line, never a request.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kubedistill import store
from kubedistill.api.models import FromTrafficSpec
from kubedistill.api.recording import RecordingSpec
from kubedistill.builders import gateway as gw
from kubedistill.builders import recording as rec
from kubedistill.domain.recording import OPERATOR_KEY_ENV, plan_recording
from kubedistill.recorder import Rule, sampled
from kubedistill.settings import Settings
from kubedistill.traffic import TrafficStream, normalise
from kubedistill_testing.cluster import free_port
from kubedistill_testing.fake_teacher import FakeTeacher
from kubedistill_testing.s3 import RcloneS3
from kubedistill_testing.servers import build_litellm

EMAIL = "alice.smith@example.org"
MARKER = "plain-alias-request"
ROOT = "s3://artifacts/kubedistill"
MASTER = "sk-master-recording-test"


def route(name: str, teacher: FakeTeacher) -> gw.Route:
    return gw.Route(
        model_name=name,
        role="primary",
        weight=100,
        deployment_id=f"default/{name}/primary",
        model="openai/fake-teacher",
        api_base=teacher.base_url,
        api_key_env=None,
        timeout_seconds=30,
    )


def rules(settings: Settings) -> dict[str, Rule]:
    specs = {
        "smart": RecordingSpec(enabled=True),
        "half": RecordingSpec(enabled=True, sample_rate=0.5),
        # Another bucket, with keys the server refuses: what a wrong credentials Secret does.
        "locked": RecordingSpec(enabled=True, destination="s3://locked/rec", credentials_secret_ref="wrong"),
    }
    out: dict[str, Rule] = {}
    for name, spec in specs.items():
        plan = plan_recording("default", name, spec, settings, ROOT)
        assert plan is not None and plan.rule is not None, plan
        out[name] = plan.rule
    return out


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, RcloneS3, Path]]:
    """The proxy's base URL, the S3 server and the proxy's log."""
    litellm = build_litellm()
    directory = tmp_path_factory.mktemp("gateway")
    with RcloneS3() as s3, FakeTeacher() as teacher:
        s3.create_bucket("artifacts")
        s3.create_bucket("locked")
        settings = Settings(
            storage_bucket="artifacts", storage_secret="s3-creds", storage_endpoint=s3.endpoint
        )
        recording = rules(settings)
        names = ["smart", "half", "locked", "plain"]
        config = rec.with_callback(
            gw.render_config([route(n, teacher) for n in names], master_key=True), recording
        )
        (directory / gw.CONFIG_KEY).write_text(config)
        for filename, text in rec.config_files(recording).items():
            (directory / filename).write_text(text)
        # The env the gateway's Deployment gets: the operator's storage keys by secretKeyRef, and the
        # copied keys Secret by envFrom (here deliberately wrong for "locked").
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBEDISTILL_"))}
        env.update(gw.OFFLINE_ENV)
        env[gw.MASTER_KEY_ENV] = MASTER
        env.update(dict(zip(OPERATOR_KEY_ENV, (s3.access_key, s3.secret_key), strict=True)))
        locked = recording["locked"]
        assert locked.access_key and locked.secret_key
        env[locked.access_key.split("/", 1)[1]] = "not-a-key"
        env[locked.secret_key.split("/", 1)[1]] = "not-a-secret"
        port = free_port()
        log = directory / "litellm.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    str(litellm),
                    "--config",
                    str(directory / gw.CONFIG_KEY),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=directory,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log.read_text()[-4000:]
                try:
                    with urllib.request.urlopen(f"{base}/health/readiness", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
            yield base, s3, log
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def chat(base: str, model: str, text: str) -> str:
    """One request through the proxy; LiteLLM's call id (the recorder's request id)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {MASTER}"}
    request = urllib.request.Request(f"{base}/v1/chat/completions", body.encode(), headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
        json.loads(response.read())
        return str(response.headers["x-litellm-call-id"])


def prompts() -> list[str]:
    """200 requests: 120 distinct prompts (40 with an e-mail address), then 80 repeats of them, half of
    which differ only in case and spacing."""
    distinct = [f"How do I export report {i}?" for i in range(80)]
    distinct += [f"Send invoice {i} to {EMAIL} please" for i in range(40)]
    repeats = [distinct[i] for i in range(0, 80, 2)] + [f" {distinct[i].upper()}  " for i in range(80, 120)]
    return distinct + repeats


def wait_for_objects(prefix: str, count: int) -> list[str]:
    deadline = time.monotonic() + 60
    while len(uris := store.list_uris(prefix + "/")) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return uris


@pytest.fixture
def s3_env(gateway: tuple[str, RcloneS3, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in gateway[1].env().items():
        monkeypatch.setenv(key, value)


@pytest.mark.usefixtures("s3_env")
def test_recorded_traffic_becomes_exactly_the_distinct_prompts_with_no_email(
    gateway: tuple[str, RcloneS3, Path],
) -> None:
    base, s3, _ = gateway
    start = datetime.now(UTC) - timedelta(seconds=1)
    texts = prompts()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: chat(base, "smart", t), texts))
        list(pool.map(lambda i: chat(base, "plain", f"{MARKER} {i} from {EMAIL}"), range(20)))
    prefix = f"{ROOT}/recordings/default/smart"
    assert len(wait_for_objects(prefix, 200)) == 200
    for path in s3.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert EMAIL.encode() not in data and MARKER.encode() not in data, path
    spec = FromTrafficSpec.model_validate({"alias": "smart", "since": "1h", "uri": prefix})
    stream = TrafficStream(spec, datetime.now(UTC) + timedelta(seconds=1))
    rows = [json.loads(line) for line in stream]
    distinct = {normalise(t) for t in texts}
    assert len(distinct) == 120
    assert (stream.counts.found, stream.counts.kept, stream.counts.deduplicated) == (200, 120, 80)
    assert stream.counts.rejected == 0
    assert {normalise(r["messages"][-1]["content"].replace("[EMAIL]", EMAIL)) for r in rows} == distinct
    assert all(r["reference"] for r in rows)
    first = store.read_json(wait_for_objects(prefix, 200)[0])
    assert datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00")) >= start
    assert first["model"] and first["usage"]["totalTokens"] > 0 and first["alias"] == "smart"


@pytest.mark.usefixtures("s3_env")
def test_sampling_keeps_exactly_the_requests_the_rate_picks(gateway: tuple[str, RcloneS3, Path]) -> None:
    base = gateway[0]
    ids = [chat(base, "half", f"sampled question {i}") for i in range(40)]
    want = {i for i in ids if sampled(i, 0.5)}
    assert 0 < len(want) < 40
    prefix = f"{ROOT}/recordings/default/half"
    uris = wait_for_objects(prefix, len(want))
    time.sleep(1.0)  # a request the rate did not pick would have landed by now too
    got = {store.read_json(u)["id"] for u in store.list_uris(prefix + "/")}
    assert got == want, (len(uris), len(want))


def test_a_destination_that_refuses_the_keys_fails_only_the_recording(
    gateway: tuple[str, RcloneS3, Path],
) -> None:
    base, s3, log = gateway
    for i in range(3):
        chat(base, "locked", f"locked question {i}")
    deadline = time.monotonic() + 30
    line = "kubedistill recording of default/locked to s3://locked/rec failed"
    while line not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    text = log.read_text(errors="replace")
    assert line in text
    assert not any(p.is_file() for p in (s3.root / "locked").rglob("*"))
    assert "locked question" not in text
