"""Tests for worker.sandbox: the local fake provider that records every raw call."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from worker.sandbox import SandboxProvider

ROOT = Path(__file__).resolve().parents[1]
CHARGE = {"payment_id": "p-1", "amount": 1250, "currency": "EUR"}


@pytest.fixture
def sandbox() -> Iterator[SandboxProvider]:
    with SandboxProvider() as sb:
        yield sb


@pytest.fixture
def client(sandbox: SandboxProvider) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, timeout=10) as c:
        yield c


def charge(
    client: httpx.Client,
    key: str | None = "k-1",
    token: int | None = None,
    body: dict | None = None,
) -> httpx.Response:
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if token is not None:
        headers["X-Fencing-Token"] = str(token)
    return client.post("/charges", json=CHARGE if body is None else body, headers=headers)


def test_health_and_url(sandbox: SandboxProvider, client: httpx.Client) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", sandbox.url)
    assert sandbox.port != 0
    r = client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_records_every_call_including_duplicates(
    sandbox: SandboxProvider, client: httpx.Client
) -> None:
    responses = [
        client.post(
            "/charges",
            json=CHARGE,
            headers={"Idempotency-Key": "dup", "X-Correlation-ID": f"c-{i}"},
        )
        for i in range(3)
    ]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.json()["id"] for r in responses] == ["charges_1", "charges_2", "charges_3"]
    assert all(r.json()["idempotency_key"] == "dup" for r in responses)

    records = sandbox.effects()
    assert len(records) == 3
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert [r["correlation_id"] for r in records] == ["c-0", "c-1", "c-2"]
    for rec in records:
        assert rec["endpoint"] == "charges" and rec["path"] == "/charges"
        assert rec["idempotency_key"] == "dup" and rec["fencing_token"] is None
        assert rec["body"] == CHARGE
        assert (rec["status"], rec["outcome"]) == (200, "effect")
        assert rec["arrived_at"] <= rec["finished_at"]
    assert client.get("/effects").json() == {"effects": records}


def test_all_endpoints_and_filter(sandbox: SandboxProvider, client: httpx.Client) -> None:
    assert (
        client.post(
            "/notifications", json={"user_id": 7, "channel": "email", "message": "hi"}
        ).status_code
        == 200
    )
    assert client.post("/webhooks", json=[1, 2]).status_code == 200
    assert client.post("/webhooks/stripe/events", json={"x": 1}).status_code == 200
    assert client.post("/exports", json={"export_id": "e-1", "rows": 3}).status_code == 200

    assert [r["endpoint"] for r in sandbox.effects()] == [
        "notifications",
        "webhooks",
        "webhooks",
        "exports",
    ]
    hooks = client.get("/effects", params={"endpoint": "webhooks"}).json()["effects"]
    assert [(h["path"], h["body"]) for h in hooks] == [
        ("/webhooks", [1, 2]),
        ("/webhooks/stripe/events", {"x": 1}),
    ]
    assert [r["endpoint"] for r in sandbox.effects("exports")] == ["exports"]


def test_stale_fencing_token_rejected(sandbox: SandboxProvider, client: httpx.Client) -> None:
    assert charge(client, token=5).status_code == 200
    assert charge(client, token=7).status_code == 200
    stale = charge(client, token=6)
    assert stale.status_code == 409
    assert stale.json() == {"error": "stale fencing token", "highest": 7}
    assert charge(client, token=7).status_code == 200  # equal is accepted
    assert charge(client, key="other", token=1).status_code == 200  # fences are per key
    assert charge(client, token=None).status_code == 200  # no token: no check

    records = sandbox.effects()
    assert [(r["fencing_token"], r["status"], r["outcome"]) for r in records] == [
        (5, 200, "effect"),
        (7, 200, "effect"),
        (6, 409, "stale_fence"),
        (7, 200, "effect"),
        (1, 200, "effect"),
        (None, 200, "effect"),
    ]
    assert sum(r["outcome"] == "effect" for r in records) == 5


def test_error_rate_one_fails_every_call(sandbox: SandboxProvider, client: httpx.Client) -> None:
    assert client.post("/faults", json={"error_rate": 1.0}).json()["error_rate"] == 1.0
    statuses = [charge(client, key=f"k-{i}").status_code for i in range(20)]
    assert statuses == [503] * 20
    records = sandbox.effects()
    assert len(records) == 20
    assert {(r["status"], r["outcome"]) for r in records} == {(503, "error")}


def test_error_rate_is_seeded(sandbox: SandboxProvider, client: httpx.Client) -> None:
    def run() -> list[int]:
        sandbox.set_faults(error_rate=0.5, seed=42)
        return [charge(client).status_code for _ in range(30)]

    first = run()
    sandbox.reset()
    assert run() == first
    assert set(first) == {200, 503}


def test_script_consumed_in_order(sandbox: SandboxProvider, client: httpx.Client) -> None:
    sandbox.set_faults(script=[503, 429, 201])
    responses = [charge(client) for _ in range(4)]
    assert [r.status_code for r in responses] == [503, 429, 201, 200]
    assert "Retry-After" not in responses[0].headers
    assert responses[1].headers["Retry-After"] == "1"
    assert [r["outcome"] for r in sandbox.effects()] == ["error", "rejected", "effect", "effect"]
    assert client.get("/faults").json()["script"] == []


def test_retry_after_seconds(sandbox: SandboxProvider, client: httpx.Client) -> None:
    sandbox.set_faults(error_rate=1.0, retry_after_seconds=2)
    assert charge(client).headers["Retry-After"] == "2"
    sandbox.set_faults(error_rate=0.0, script=[429])
    assert charge(client).headers["Retry-After"] == "2"


def test_outage(sandbox: SandboxProvider, client: httpx.Client) -> None:
    sandbox.set_faults(outage=True)
    assert [charge(client).status_code for _ in range(3)] == [503, 503, 503]
    assert client.post("/webhooks", json={}).status_code == 503
    sandbox.set_faults(outage=False)
    assert charge(client).status_code == 200
    assert [r["outcome"] for r in sandbox.effects()] == ["outage"] * 4 + ["effect"]


def test_latency_makes_concurrent_calls_overlap(
    sandbox: SandboxProvider, client: httpx.Client
) -> None:
    sandbox.set_faults(latency_seconds=0.3, latency_by_endpoint={"notifications": 0})
    barrier = threading.Barrier(2, timeout=10)

    def call(_: int) -> int:
        barrier.wait()
        return charge(client, key="same").status_code

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(call, range(2))) == [200, 200]
    a, b = sandbox.effects()
    assert a["arrived_at"] < b["finished_at"] and b["arrived_at"] < a["finished_at"]
    assert all(r["finished_at"] - r["arrived_at"] >= 0.29 for r in (a, b))

    client.post("/notifications", json={"user_id": 1, "channel": "sms", "message": "m"})
    note = sandbox.effects("notifications")[0]
    assert note["finished_at"] - note["arrived_at"] < 0.29


def test_charge_validation(sandbox: SandboxProvider, client: httpx.Client) -> None:
    bad = [
        {"payment_id": "p", "amount": 5},
        {**CHARGE, "amount": 0},
        {**CHARGE, "amount": -3},
        {**CHARGE, "amount": "10"},
    ]
    assert [charge(client, body=b).status_code for b in bad] == [422] * 4
    assert client.post("/charges", json=[1]).status_code == 422
    assert {r["outcome"] for r in sandbox.effects()} == {"rejected"}


def test_reset_clears_records_fences_and_faults(
    sandbox: SandboxProvider, client: httpx.Client
) -> None:
    assert charge(client, token=9).status_code == 200
    sandbox.set_faults(latency_seconds=0.5, script=[500])
    assert client.post("/reset").json() == {"status": "reset"}
    assert sandbox.effects() == []
    assert client.get("/faults").json()["script"] == []
    assert sandbox.faults()["latency_seconds"] == 0.0
    assert charge(client, token=1).status_code == 200  # fence memory gone too
    assert [r["seq"] for r in sandbox.effects()] == [1]


def test_not_found_and_bad_requests(sandbox: SandboxProvider, client: httpx.Client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert client.post("/charges/extra", json=CHARGE).status_code == 404
    assert client.get("/charges").status_code == 404

    r = client.post("/charges", content=b"{not json", headers={"Idempotency-Key": "bad"})
    assert r.status_code == 400 and r.json()["error"] == "invalid JSON body"
    r = charge(client, body=CHARGE, key="k", token=None)
    bad_token = client.post("/charges", json=CHARGE, headers={"X-Fencing-Token": "x"})
    assert bad_token.status_code == 400
    assert [(x["idempotency_key"], x["status"], x["outcome"]) for x in sandbox.effects()] == [
        ("bad", 400, "rejected"),
        ("k", 200, "effect"),
        (None, 400, "rejected"),
    ]

    assert client.post("/faults", content=b"[").status_code == 400
    assert client.post("/faults", json={"error_rate": 2}).status_code == 400
    assert client.post("/faults", json={"nope": 1}).status_code == 400
    with pytest.raises(ValueError):
        sandbox.set_faults(script=["503"])
    assert client.get("/health").status_code == 200  # server survived all of it


def test_concurrent_keep_alive_calls_all_recorded(
    sandbox: SandboxProvider, client: httpx.Client
) -> None:
    def call(i: int) -> int:
        return charge(client, key=f"k-{i % 10}").status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(call, range(400)))
    assert statuses == [200] * 400
    records = sandbox.effects()
    assert [r["seq"] for r in records] == list(range(1, 401))
    assert sum(r["idempotency_key"] == "k-3" for r in records) == 40


def test_stop_closes_server(client: httpx.Client, sandbox: SandboxProvider) -> None:
    assert client.get("/health").status_code == 200  # leaves a keep-alive connection open
    sandbox.stop()
    with pytest.raises(httpx.TransportError):
        client.get("/health")


def test_cli_serves_on_ephemeral_port() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=20)
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match and match.group(1) != "0", line
        with httpx.Client(base_url=match.group(0), timeout=10) as c:
            assert c.get("/health").json() == {"status": "ok"}
            assert c.post("/exports", json={"export_id": "e"}).json()["id"] == "exports_1"
            assert len(c.get("/effects").json()["effects"]) == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
