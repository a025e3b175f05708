"""Alert hooks (seed 004): log, metric, event stream and webhook, masked, never fatal.

The webhook is the sandbox provider's ``/webhooks/<path>`` endpoint, which records every
POST (body, status, idempotency key) and fails on cue (``script``, ``outage``). Waits and
the time budget run on an injected clock: nothing sleeps.
"""

from __future__ import annotations

import socket
from typing import Any

from structlog.testing import capture_logs

from config import Settings
from reliability.alerts import (
    ALERTS,
    HOOK_FAILURES,
    AlertHooks,
    count_alert,
    event_stream_hook,
    log_hook,
    recent_alerts,
    webhook_hook,
)
from reliability.breaker import BreakerConfig, CircuitBreaker
from reliability.breaker.monitor import OPEN_TOO_LONG, BreakerMonitor, MonitorPolicy
from reliability.errors import TransientError
from reliability.runtime import Runtime
from reliability.security import Masker
from reliability.store import Store
from worker.alerting import alert_hooks
from worker.sandbox import SandboxProvider

SECRET = "s3cr3t-value"


class FakeTime:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def dead_url() -> str:
    """A URL nothing listens on (connection refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/pager"


def counted(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def test_a_webhook_failing_twice_is_retried_with_backoff_and_gets_one_masked_payload(
    sandbox: SandboxProvider,
) -> None:
    fake = FakeTime()
    hooks = AlertHooks(Masker([SECRET]))
    hooks.add_webhook_hook(
        webhook_hook(
            f"{sandbox.url}/webhooks/pager", backoff_seconds=0.5, sleep=fake.sleep, clock=fake
        )
    )
    sandbox.set_faults(script=[503, 429])
    context = {
        "api_key": "k-123",
        "detail": f"Authorization: Bearer abc.def with {SECRET}",
        "dsn": "redis://:pw@host/0",
        "nested": {"password": "hunter2", "count": 2},
    }
    hooks.emit("dlq_entry_held", f"entry held: {SECRET}", context)
    calls = sandbox.effects("webhooks")
    assert [c["status"] for c in calls] == [503, 429, 200]
    assert len({c["idempotency_key"] for c in calls}) == 1
    assert fake.waits == [0.5, 1.0]
    assert calls[-1]["body"] == {
        "event": "dlq_entry_held",
        "message": "entry held: ***",
        "api_key": "***",
        "detail": "Authorization: Bearer *** with ***",
        "dsn": "redis://:***@host/0",
        "nested": {"password": "***", "count": 2},
    }
    assert context["api_key"] == "k-123"  # the caller's data is not changed


def test_a_client_error_is_not_retried(sandbox: SandboxProvider) -> None:
    fake = FakeTime()
    hooks = AlertHooks()
    hooks.add_webhook_hook(webhook_hook(f"{sandbox.url}/webhooks/pager", sleep=fake.sleep))
    sandbox.set_faults(script=[404])
    with capture_logs() as logs:
        hooks.emit("x", "y", {})
    assert [c["status"] for c in sandbox.effects("webhooks")] == [404]
    assert fake.waits == []
    assert [(e["kind"], e["error"]) for e in logs if e["event"] == "alert_hook_failed"] == [
        ("webhook", "webhook answered 404")
    ]


def test_no_attempt_starts_past_the_time_budget(sandbox: SandboxProvider) -> None:
    fake = FakeTime()
    hooks = AlertHooks()
    hooks.add_webhook_hook(
        webhook_hook(
            f"{sandbox.url}/webhooks/pager",
            attempts=10,
            max_seconds=5.0,
            backoff_seconds=1.0,
            sleep=fake.sleep,
            clock=fake,
        )
    )
    sandbox.set_faults(outage=True)
    with capture_logs() as logs:
        hooks.emit("x", "y", {})
    # Attempts at 0, 1 and 3 s; the next would start at 7 s, past the 5 s budget.
    assert [c["status"] for c in sandbox.effects("webhooks")] == [503] * 3
    assert fake.waits == [1.0, 2.0]
    assert [e["error"] for e in logs if e["event"] == "alert_hook_failed"] == [
        "webhook answered 503"
    ]


def test_a_dead_webhook_does_not_break_the_job_and_the_other_hooks_still_run(
    bare_store: Store,
) -> None:
    fake = FakeTime()
    url = dead_url() + f"?token={SECRET}"
    hooks = AlertHooks(Masker([url]))
    hooks.add_event_hook(event_stream_hook(bare_store))
    hooks.add_webhook_hook(webhook_hook(url, sleep=fake.sleep, clock=fake))
    breaker = CircuitBreaker("pager-test", bare_store, BreakerConfig(failure_threshold=1))
    breaker.record("f", TransientError("503"), 0.01, now=1000.0)
    monitor = BreakerMonitor(bare_store, [breaker], hooks, MonitorPolicy(open_alert_seconds=1))
    failed = counted(HOOK_FAILURES, "webhook")
    with capture_logs() as logs:
        assert monitor.run(now=1002.0)["alerts"] == 1
    assert fake.waits == [0.5, 1.0]  # three attempts, then given up
    [alert] = recent_alerts(bare_store)
    assert (alert["event"], alert["context"]["breaker"]) == (OPEN_TOO_LONG, "pager-test")
    [failure] = [e for e in logs if e["event"] == "alert_hook_failed"]
    assert (failure["hook"], failure["error"]) == ("webhook", "webhook unreachable: ConnectError")
    assert counted(HOOK_FAILURES, "webhook") == failed + 1
    assert SECRET not in repr(logs)


def test_the_event_stream_keeps_the_newest_alerts(bare_store: Store) -> None:
    hooks = AlertHooks()
    hooks.add_event_hook(event_stream_hook(bare_store, max_len=100))
    for i in range(130):
        hooks.emit("retry_spike", f"spike {i}", {"task": "payments.charge", "n": i})
    newest = recent_alerts(bare_store, count=1000)
    assert len(newest) == 100
    assert [a["context"]["n"] for a in newest[:2]] == [129, 128]
    assert newest[-1]["message"] == "spike 30"
    assert newest[0]["context"] == {"task": "payments.charge", "n": 129}


def test_log_and_metric_hooks(bare_store: Store) -> None:
    hooks = AlertHooks()
    hooks.add_log_hook(log_hook({"circuit_breaker_closed": "info"}))
    hooks.add_metric_hook(count_alert)
    before = counted(ALERTS, "circuit_breaker_flapping")
    with capture_logs() as logs:
        hooks.emit("circuit_breaker_flapping", "flaps", {"breaker": "b", "event": "odd key"})
        hooks.emit("circuit_breaker_closed", "ok", {"breaker": "b"})
    assert [(e["event"], e["log_level"], e["message"]) for e in logs] == [
        ("circuit_breaker_flapping", "warning", "flaps"),
        ("circuit_breaker_closed", "info", "ok"),
    ]
    assert logs[0]["context_event"] == "odd key"
    assert counted(ALERTS, "circuit_breaker_flapping") == before + 1


def test_the_worker_builds_every_hook_from_settings(
    bare_store: Store, sandbox: SandboxProvider
) -> None:
    url = f"{sandbox.url}/webhooks/pager?token={SECRET}"
    settings = Settings(
        alerts={"webhook_url": url, "webhook_backoff_seconds": 0.01, "stream_max_len": 500}
    )
    runtime = Runtime(bare_store, masker=Masker(settings.secret_values()))
    hooks = alert_hooks(settings, runtime)
    before = counted(ALERTS, "dlq_entry_held")
    sandbox.set_faults(script=[502])
    with capture_logs() as logs:
        hooks.emit("dlq_entry_held", "held", {"entry": "e1", "target": url})
    [alert] = recent_alerts(bare_store)
    assert (alert["event"], alert["context"]) == (
        "dlq_entry_held",
        {"entry": "e1", "target": "***"},
    )
    assert [(c["status"], c["body"]["target"]) for c in sandbox.effects("webhooks")] == [
        (502, "***"),
        (200, "***"),
    ]
    assert [e["event"] for e in logs] == ["dlq_entry_held"]
    assert counted(ALERTS, "dlq_entry_held") == before + 1
