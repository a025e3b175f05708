"""The ops HTTP service (``python -m worker.ops``) as a real process over real Redis.

Health, the admin API behind bearer tokens, throttled authentication failures, every
bad input answered 422 (never 500), and no secret in any answer. One ops process and
one worker (for redrives that must really run) are shared by the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.ledger import Ledger
from reliability.reports.period import Period
from reliability.reports.storage import ReportStore
from reliability.store import Store
from tests.support.fleet import (
    ROOT,
    Environment,
    OpsProcess,
    WorkerProcess,
    delete_prefix,
    free_port,
    wait_until,
)
from worker.sandbox import SandboxProvider

TOKEN = "ops-admin-token-7f3a9c2e1b7d"
OTHER = "ops-viewer-token-00aa11bb22cc"
API_KEY = "sk_live_paymentkey_4242424242"  # a configured secret: never in an answer
FAILURES = 5
OPS_SETTINGS = {
    "RELIABLE_OPS__ADMIN_TOKENS": json.dumps({"alice": TOKEN, "bob": OTHER}),
    "RELIABLE_OPS__AUTH_FAILURES": str(FAILURES),
    "RELIABLE_OPS__AUTH_FAILURE_WINDOW_SECONDS": "60",
    "RELIABLE_PROVIDERS__PAYMENT_API_KEY": API_KEY,
}
ALICE = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxProvider]:
    with SandboxProvider().start() as provider:
        yield provider


@pytest.fixture(scope="module")
def env(redis_url: str, sandbox: SandboxProvider) -> Iterator[Environment]:
    environment = Environment(redis_url=redis_url, sandbox_url=sandbox.url, extra=OPS_SETTINGS)
    yield environment
    delete_prefix(redis_url, environment.prefix)


@pytest.fixture(scope="module")
def ops(env: Environment) -> Iterator[OpsProcess]:
    with OpsProcess(env) as process:
        yield process


@pytest.fixture(scope="module")
def worker(env: Environment) -> Iterator[WorkerProcess]:
    with WorkerProcess(env, concurrency=1, pool="solo") as process:
        yield process


@pytest.fixture(scope="module")
def store(env: Environment) -> Store:
    return Store(env.redis_url, env.prefix)


def get(ops: OpsProcess, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(ops.url + path, timeout=30, **kwargs)


def post(ops: OpsProcess, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(ops.url + path, timeout=30, **kwargs)


def charge_entry(failure_class: str = "transient", amount: int = 100) -> DeadLetter:
    return DeadLetter(
        task_name="payments.charge",
        task_id=uuid.uuid4().hex,
        failure_class=failure_class,
        kwargs={"payment_id": "pay-" + uuid.uuid4().hex[:8], "amount": amount, "currency": "EUR"},
        exception_type="TransientError",
        exception_message="http://127.0.0.1:8099/charges answered 503",
    )


# -- health --------------------------------------------------------------------------------


def test_liveness_and_readiness_answer_in_seed_002s_shape(ops: OpsProcess) -> None:
    for path in ("/health", "/health/live"):
        body = get(ops, path).json()
        assert body["status"] == "healthy" and set(body) == {"status", "version", "environment"}
    ready = get(ops, "/health/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True
    assert set(ready.json()["components"]) == {"redis", "broker"}
    assert all(c["status"] == "healthy" for c in ready.json()["components"].values())


def test_readiness_is_503_when_the_state_store_is_unreachable(env: Environment) -> None:
    closed = f"redis://:{API_KEY}@127.0.0.1:{free_port()}/0"
    with OpsProcess(env, RELIABLE_REDIS__URL=closed) as down:
        ready = get(down, "/health/ready")
        live = get(down, "/health/live")
        admin = get(down, "/admin/reliability/circuit-breakers", headers=ALICE)
    assert live.status_code == 200  # liveness never depends on a dependency
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert ready.json()["components"]["redis"]["status"] == "unhealthy"
    assert admin.status_code == 503  # the store is away: a clear answer, not a 500
    for response in (ready, admin):
        assert API_KEY not in response.text


def test_detailed_health_and_the_guard_views(ops: OpsProcess, worker: WorkerProcess) -> None:
    body = get(ops, "/health/detailed").json()
    assert {"components", "workers", "circuit_breakers", "degradation", "dlq", "jobs"} <= set(body)
    [row] = [w for w in body["workers"] if w["pid"] == worker.pid]
    assert (row["node"].split("@")[0], row["alive"]) == (worker.name, True)  # its Celery node
    names = {b["name"] for b in get(ops, "/health/circuit-breakers").json()["breakers"]}
    assert {"payment", "notification"} <= names
    assert get(ops, "/health/degradation").json()["level"] == "NORMAL"
    assert get(ops, "/health/dlq").json()["total"] >= 0


# -- authentication --------------------------------------------------------------------------


def test_admin_needs_a_bearer_token_and_names_who_acted(ops: OpsProcess) -> None:
    path = "/admin/reliability/circuit-breakers"
    missing = get(ops, path)
    wrong = get(ops, path, headers={"Authorization": "Bearer not-the-token-at-all"})
    right = get(ops, path, headers=ALICE)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert wrong.status_code == 403
    assert right.status_code == 200
    assert post(ops, f"{path}/analytics/shadow", headers=ALICE).json()["mode"] == "shadow"
    post(ops, f"{path}/analytics/normal", headers={"Authorization": f"Bearer {OTHER}"})
    trail = get(ops, "/admin/reliability/audit", headers=ALICE).json()["entries"]
    assert [(e["who"], e["action"], e["target"]) for e in trail[:2]] == [
        ("bob", "breaker.normal", "analytics"),
        ("alice", "breaker.shadow", "analytics"),
    ]


def test_repeated_failures_from_one_client_are_throttled_fleet_wide(env: Environment) -> None:
    # Its own ops process and prefix: the failure window is shared by every replica.
    own = Environment(redis_url=env.redis_url, extra=OPS_SETTINGS)
    try:
        with OpsProcess(own) as first, OpsProcess(own) as second:
            path = "/admin/reliability/dlq"
            codes = [get(first, path).status_code for _ in range(FAILURES)]
            blocked = get(second, path, headers=ALICE)  # another replica, the right token
        assert codes == [401] * FAILURES
        assert blocked.status_code == 429
        # When the oldest failure leaves the 60 s window, counted down from it.
        retry_after = int(blocked.headers["Retry-After"])
        assert 1 <= retry_after <= 60
        assert blocked.headers["X-RateLimit-Reset"] == str(retry_after)
        assert blocked.headers["X-RateLimit-Limit"] == str(FAILURES)
        assert blocked.headers["X-RateLimit-Remaining"] == "0"
    finally:
        delete_prefix(env.redis_url, own.prefix)


# -- breakers, limits, degradation ---------------------------------------------------------


def test_breaker_actions_change_the_fleets_breaker(ops: OpsProcess) -> None:
    base = "/admin/reliability/circuit-breakers/payment"
    forced = post(ops, f"{base}/force-open", headers=ALICE).json()
    assert (forced["state"], forced["mode"]) == ("open", "forced_open")  # as the list shows it
    states = {
        b["name"]: b["state"] for b in get(ops, "/health/circuit-breakers").json()["breakers"]
    }
    assert states["payment"] == "open"
    assert post(ops, f"{base}/normal", headers=ALICE).status_code == 200
    assert post(ops, f"{base}/reset", headers=ALICE).json()["state"] == "closed"
    assert (
        post(ops, "/admin/reliability/circuit-breakers/nope/reset", headers=ALICE).status_code
        == 404
    )
    assert post(ops, f"{base}/explode", headers=ALICE).status_code == 422


def test_rate_limits_are_shown_and_changed_at_runtime(ops: OpsProcess) -> None:
    path = "/admin/reliability/rate-limits"
    limits = {x["name"]: x for x in get(ops, path, headers=ALICE).json()["rate_limits"]}
    assert limits["payment-gateway"]["kind"] == "gcra"
    changed = post(ops, f"{path}/payment-gateway", headers=ALICE, json={"rate": 7.5})
    assert changed.status_code == 200 and changed.json()["rate"] == 7.5
    after = {x["name"]: x for x in get(ops, path, headers=ALICE).json()["rate_limits"]}
    assert (
        after["payment-gateway"]["rate"] == 7.5 and after["payment-gateway"]["changed_at_runtime"]
    )
    wrong_field = post(ops, f"{path}/payment-gateway", headers=ALICE, json={"limit": 3})
    assert wrong_field.status_code == 422 and "gcra" in wrong_field.text
    assert post(ops, f"{path}/nope", headers=ALICE, json={"rate": 1}).status_code == 404
    assert post(ops, f"{path}/payment-gateway", headers=ALICE, json={"rate": -1}).status_code == 422


def test_degradation_is_set_with_a_reason_and_cleared(ops: OpsProcess) -> None:
    path = "/admin/reliability/degradation"
    set_ = post(
        ops,
        f"{path}/set-level",
        headers=ALICE,
        params={"level": "MODERATE", "reason": "maintenance", "expires_minutes": 5},
    )
    assert set_.status_code == 200
    shown = get(ops, "/health/degradation").json()
    assert shown["level"] == "MODERATE"
    assert shown["override"]["by"] == "ops:alice" and shown["override"]["reason"] == "maintenance"
    bad = post(ops, f"{path}/set-level", headers=ALICE, params={"level": "PANIC", "reason": "x"})
    assert bad.status_code == 422
    assert post(ops, f"{path}/clear", headers=ALICE).status_code == 200
    assert get(ops, "/health/degradation").json()["level"] == "NORMAL"


# -- DLQ -------------------------------------------------------------------------------------


def test_the_dlq_is_paged_filtered_shown_and_purged(ops: OpsProcess, store: Store) -> None:
    dlq = DeadLetterQueue(store)
    ids = []
    for i in range(7):
        entry = charge_entry("permanent" if i % 2 else "poison")
        dlq.add(entry, Ledger(store))
        ids.append(entry.id)
    path = "/admin/reliability/dlq"
    first = get(ops, path, headers=ALICE, params={"limit": 3}).json()
    second = get(ops, path, headers=ALICE, params={"limit": 3, "offset": 3}).json()
    assert first["has_more"] and len(first["entries"]) == 3 and len(second["entries"]) == 3
    assert not {e["id"] for e in first["entries"]} & {e["id"] for e in second["entries"]}
    poison = get(ops, path, headers=ALICE, params={"failure_class": "poison", "limit": 500})
    assert {e["id"] for e in poison.json()["entries"]} >= set(ids[0::2])
    shown = get(ops, f"{path}/{ids[1]}", headers=ALICE).json()
    assert shown["id"] == ids[1] and len(shown["fingerprint"]) == 12
    assert get(ops, f"{path}/{uuid.uuid4().hex}", headers=ALICE).status_code == 404
    groups = get(ops, f"{path}/groups", headers=ALICE).json()
    assert groups["groups"][0]["count"] >= 7
    unconfirmed = post(ops, f"{path}/purge", headers=ALICE, json={"failure_class": "poison"})
    assert unconfirmed.status_code == 422
    purged = post(
        ops, f"{path}/purge", headers=ALICE, json={"failure_class": "poison", "confirm": True}
    )
    assert purged.json()["purged"] >= 4
    assert all(dlq.get(i) is None for i in ids[0::2]) and dlq.get(ids[1]) is not None


def test_a_retried_entry_runs_once_at_the_provider(
    ops: OpsProcess, worker: WorkerProcess, store: Store, sandbox: SandboxProvider
) -> None:
    entry = charge_entry("transient", amount=4242)
    DeadLetterQueue(store).add(entry, Ledger(store))
    answer = post(ops, f"/admin/reliability/dlq/{entry.id}/retry", headers=ALICE)
    assert answer.status_code == 200
    again = post(ops, f"/admin/reliability/dlq/{entry.id}/retry", headers=ALICE)
    assert again.status_code == 404  # removed once redriven: never twice
    payment = entry.kwargs["payment_id"]

    def charged() -> list[dict[str, Any]]:
        return [e for e in sandbox.effects(endpoint="charges") if payment in json.dumps(e)]

    wait_until(charged, 30, message="the redriven charge reached the provider")
    assert len(charged()) == 1
    trail = get(ops, "/admin/reliability/audit", headers=ALICE).json()["entries"]
    assert trail[0]["action"] == "dlq.retry" and trail[0]["target"] == entry.id


# -- reports and ledger ----------------------------------------------------------------------


def test_reports_and_the_ledger(ops: OpsProcess, store: Store) -> None:
    assert get(ops, "/admin/reliability/reports/day", headers=ALICE).status_code == 404
    start = (time.time() // 3600 - 1) * 3600
    ReportStore(store).save(Period("hour", start, start + 3600), {"period": "hour", "tasks": []})
    latest = get(ops, "/admin/reliability/reports/reliability", headers=ALICE)
    assert latest.status_code == 200 and latest.json()["period"] == "hour"
    recent = get(ops, "/admin/reliability/reports/hour/recent", headers=ALICE).json()
    assert len(recent["reports"]) == 1
    Ledger(store).record("t-ops", "payments.charge", "succeeded", 1, "")
    rows = get(ops, "/admin/reliability/ledger", headers=ALICE, params={"task": "payments.charge"})
    [row] = [r for r in rows.json()["entries"] if r["task_id"] == "t-ops"]
    assert (row["outcome"], row["attempt"], type(row["at"])) == ("succeeded", 1, float)


# -- hostile input and secrets -------------------------------------------------------------


def test_bad_input_is_422_and_never_echoes_it(ops: OpsProcess) -> None:
    cases = [
        ("get", "/admin/reliability/dlq", {"params": {"limit": "abc"}}),
        ("get", "/admin/reliability/dlq", {"params": {"offset": -1}}),
        ("get", "/admin/reliability/dlq", {"params": {"fingerprint": TOKEN}}),
        ("post", "/admin/reliability/dlq/retry", {"content": b"\xff\xfe{not json"}),
        ("post", "/admin/reliability/dlq/purge", {"json": {"confirm": "maybe"}}),
        ("post", "/admin/reliability/rate-limits/payment-gateway", {"json": [1, 2]}),
        ("post", "/admin/reliability/rate-limits/payment-gateway", {"json": {"rate": "x" * 10**6}}),
        ("get", "/admin/reliability/dlq/" + "x" * 500, {}),
    ]
    for method, path, kwargs in cases:
        headers = {**ALICE, "Content-Type": "application/json"}
        response = httpx.request(method, ops.url + path, headers=headers, timeout=30, **kwargs)
        assert response.status_code in (400, 404, 413, 422), (path, response.status_code)
        assert TOKEN not in response.text[:1000] and "xxxxxxxxxx" not in response.text


def test_a_body_over_the_cap_is_413_unread_and_a_misspelt_field_is_422(
    ops: OpsProcess, store: Store
) -> None:
    """20 MB bodies (declared or chunked) are refused before they are read; a misspelt
    condition of a bulk retry is refused, never widened to "every entry"."""
    dlq = DeadLetterQueue(store)
    entry = charge_entry()
    dlq.add(entry, Ledger(store))
    huge = b'{"rate": 1, "x": "' + b"a" * 20_000_000 + b'"}'
    headers = {**ALICE, "Content-Type": "application/json"}
    path = "/admin/reliability/rate-limits/payment-gateway"
    declared = post(ops, path, content=huge, headers=headers)
    chunked = post(
        ops,
        path,
        content=iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)]),
        headers=headers,
    )
    assert (declared.status_code, chunked.status_code) == (413, 413)
    assert "refused unread" in declared.json()["detail"] == chunked.json()["detail"]
    misspelt = post(
        ops, "/admin/reliability/dlq/retry", json={"failure_clas": "transient"}, headers=ALICE
    )
    assert misspelt.status_code == 422
    assert misspelt.json()["detail"] == [
        {"loc": ["body", "failure_clas"], "msg": "Extra inputs are not permitted"}
    ]
    assert post(ops, path, json={"rate": 5, "brust": 3}, headers=ALICE).status_code == 422
    assert dlq.get(entry.id) is not None  # nothing was redriven
    dlq.remove(entry.id)


def test_no_secret_in_any_answer(ops: OpsProcess) -> None:
    paths = [
        "/health/detailed",
        "/openapi.json",
        "/admin/reliability/circuit-breakers",
        "/admin/reliability/rate-limits",
        "/admin/reliability/dlq",
        "/admin/reliability/audit",
        "/metrics",
    ]
    for path in paths:
        text = get(ops, path, headers=ALICE).text
        assert API_KEY not in text and TOKEN not in text and OTHER not in text, path


def test_schemathesis_finds_no_server_error(env: Environment) -> None:
    """Every operation of the published OpenAPI spec, fuzzed (about 1,100 requests): no
    answer is a 5xx. Its own ops process: the fuzzer's unauthenticated requests must not
    throttle it into answering only 429, nor its failures count against the others."""
    own = Environment(redis_url=env.redis_url, extra=OPS_SETTINGS)
    with OpsProcess(own, RELIABLE_OPS__AUTH_FAILURES="1000000") as ops:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"{ops.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--max-examples",
                "25",
                "--request-timeout",
                "20",
                "--generation-deterministic",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    delete_prefix(env.redis_url, own.prefix)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
