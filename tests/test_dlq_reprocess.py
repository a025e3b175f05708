"""DLQ reprocessing by policy (reliability/reprocess.py), against a real Redis.

Entries are written with ``DeadLetterQueue.add`` as the worker's dead-letter paths write
them; a recording publisher stands in for the broker and the clock is injected, so each
test decides exactly which entries are due. The fleet test (real worker, sandbox
provider, the beat job) is ``tests/test_dlq_reprocess_fleet.py``.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from config import SettingsError, load_settings
from reliability.alerts import AlertHooks
from reliability.breaker import BreakerMode, BreakerRegistry
from reliability.dlq import DeadLetter, DeadLetterQueue, Filter
from reliability.errors import TransientError
from reliability.gates import TaskGates
from reliability.ledger import Ledger
from reliability.ratelimit import RateLimit, RateLimiter
from reliability.reprocess import Reprocessor, ReprocessPolicy
from reliability.security import Masker
from reliability.store import Store

T0 = 1_800_000_000.0  # every entry's last failure; runs pass `now` relative to it
SECRET = "sk_live_" + uuid.uuid4().hex
HELD = ("permanent", "poison", "conflict", "expired")


class Recorder:
    """A broker that records what it is asked to publish (thread-safe)."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.sent: list[dict[str, Any]] = []
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if self.fail:
            raise ConnectionError("broker unreachable")
        time.sleep(self.delay)  # widens the window in which two reprocessors race
        task_id = uuid.uuid4().hex
        with self.lock:
            self.sent.append({"name": name, "kwargs": kwargs, "options": options, "id": task_id})
        return type("Result", (), {"id": task_id})()


class Alerts(AlertHooks):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, dict[str, Any]]] = []
        self.add_log_hook(lambda *event: self.seen.append(event))


def charge_entry(failure_class: str = "transient", **fields: Any) -> DeadLetter:
    payment_id = fields.pop("payment_id", "pay-" + uuid.uuid4().hex[:8])
    fields.setdefault("exception_type", "TransientError")
    fields.setdefault("exception_message", "http://127.0.0.1:8099/charges answered 503")
    fields.setdefault("last_failure_at", T0)
    return DeadLetter(
        task_name="payments.charge",
        task_id=uuid.uuid4().hex,
        failure_class=failure_class,
        kwargs={"payment_id": payment_id, "amount": 100, "currency": "EUR"},
        **fields,
    )


def fill(store: Store, entries: list[DeadLetter]) -> DeadLetterQueue:
    dlq = DeadLetterQueue(store, max_redrives=3)
    for entry in entries:
        dlq.add(entry, Ledger(store))
    return dlq


def build(
    store: Store,
    publisher: Recorder,
    *,
    gates: Callable[[str], TaskGates] = lambda _: TaskGates(),
    hooks: AlertHooks | None = None,
    by: str = "test",
    **policy: Any,
) -> Reprocessor:
    return Reprocessor(
        DeadLetterQueue(store, max_redrives=3),
        BreakerRegistry(store),
        publisher,
        gates=gates,
        hooks=hooks,
        masker=Masker([SECRET]),
        policy=ReprocessPolicy(**{"backoff_base_seconds": 60.0, **policy}),
        by=by,
    )


def redriven_records(store: Store) -> list[dict[str, Any]]:
    return [r for r in Ledger(store).entries() if r["outcome"] == "redriven"]


def test_transient_entries_are_redriven_once_and_held_classes_alerted_once(
    bare_store: Store,
) -> None:
    redrivable = [charge_entry("transient") for _ in range(2)] + [
        charge_entry("retry_budget_exhausted")
    ]
    held = [charge_entry(c, exception_type="PermanentError") for c in HELD]
    dlq = fill(bare_store, redrivable + held)
    publisher, alerts = Recorder(), Alerts()

    first = build(bare_store, publisher, hooks=alerts, by="job:a").run(now=T0 + 3600)

    assert (first.actions["redrive"], first.actions["hold"], first.alerted) == (3, 4, 4)
    assert sorted(s["kwargs"]["payment_id"] for s in publisher.sent) == sorted(
        e.kwargs["payment_id"] for e in redrivable
    )
    assert {e.id for e in dlq.iter()} == {e.id for e in held}
    # Each redrive: one ledger record (task, detail `dlq <id>`) and one audit trail entry.
    records = redriven_records(bare_store)
    assert sorted(r["detail"] for r in records) == sorted(f"dlq {e.id}" for e in redrivable)
    assert {r["task"] for r in records} == {"payments.charge"}
    for sent in publisher.sent:
        [trail] = dlq.redrives.trail(sent["id"])
        assert trail["by"] == "job:a" and trail["task_id"] == sent["id"]
        assert trail["redrive"] == 1 and trail["at"] > 0
        assert sent["options"]["headers"]["rel_redrive"] == 1
    assert sorted(a[2]["failure_class"] for a in alerts.seen) == sorted(HELD)
    assert {a[0] for a in alerts.seen} == {"dlq_entry_held"}

    # Later runs hold the same entries and alert no more, whoever runs them.
    again = [build(bare_store, publisher, hooks=alerts, by=b).run(now=T0 + 7200) for b in "bc"]
    assert [(r.actions["hold"], r.alerted, r.actions["redrive"]) for r in again] == [(4, 0, 0)] * 2
    assert len(alerts.seen) == 4 and len(publisher.sent) == 3


def test_an_entry_waits_for_its_backoff_and_is_held_at_the_redrive_cap(bare_store: Store) -> None:
    fresh, twice = charge_entry(), charge_entry(redrive_count=2)
    capped = charge_entry(redrive_count=3)
    masked = charge_entry(masked_args=["card_number"])
    fill(bare_store, [fresh, twice, capped, masked])
    publisher = Recorder()

    def decisions(now: float) -> dict[str, str]:
        result = build(bare_store, publisher).run(now=now)
        return {d.entry_id: f"{d.action}: {d.reason}" for d in result.decisions}

    # base 60 s: the first redrive after 60 s, the third (2 redrives done) after 240 s.
    assert decisions(T0 + 59) == {
        fresh.id: "wait: backoff",
        twice.id: "wait: backoff",
        capped.id: "hold: redrive cap",
        masked.id: "hold: masked arguments",
    }
    assert decisions(T0 + 60)[fresh.id] == "redrive: due"
    assert decisions(T0 + 239)[twice.id] == "wait: backoff"
    assert decisions(T0 + 240)[twice.id] == "redrive: due"
    assert len(publisher.sent) == 2


def test_entries_wait_while_their_tasks_breaker_is_not_closed(bare_store: Store) -> None:
    entries = [charge_entry() for _ in range(3)]
    dlq = fill(bare_store, entries)
    breaker = BreakerRegistry(bare_store).get("payment")
    for _ in range(breaker.config.failure_threshold):
        breaker.record("probe", TransientError("503"), 0.01)
    assert breaker.snapshot()["state"] == "open"
    publisher = Recorder()
    gates = lambda name: TaskGates(breaker="payment")  # noqa: E731

    def run() -> Any:
        return build(bare_store, publisher, gates=gates).run(now=T0 + 3600)

    held_back = run()
    assert held_back.actions["wait"] == 3 and publisher.sent == []
    assert set(held_back.reasons) == {"wait: breaker payment not closed"}
    breaker.reset()
    breaker.set_mode(BreakerMode.FORCED_OPEN)
    assert run().actions["wait"] == 3 and publisher.sent == []
    breaker.set_mode(BreakerMode.NORMAL)
    assert run().actions["redrive"] == 3 and dlq.count() == 0


def test_a_run_redrives_no_more_than_the_rate_limit_admits_and_takes_no_token(
    bare_store: Store,
) -> None:
    limit = RateLimit(name="reprocess-test", kind="gcra", rate=0.001, burst=2)
    entries = [charge_entry() for _ in range(5)]
    fill(bare_store, entries)
    publisher = Recorder()
    gates = lambda name: TaskGates(limits=(limit,))  # noqa: E731
    limiter = RateLimiter(bare_store, limit)

    first = build(bare_store, publisher, gates=gates).run(now=T0 + 3600)
    assert (first.actions["redrive"], first.actions["wait"]) == (2, 3)
    assert first.reasons["wait: rate limit reprocess-test"] == 3
    assert round(limiter.available_tokens) == 2  # read, not taken
    # The redriven tasks take their tokens at admission: the next run finds none left.
    assert limiter.try_acquire() and limiter.try_acquire()
    second = build(bare_store, publisher, gates=gates).run()
    assert (second.actions["redrive"], second.actions["wait"]) == (0, 3)
    assert len(publisher.sent) == 2


def test_two_reprocessors_racing_redrive_each_entry_exactly_once(bare_store: Store) -> None:
    entries = [charge_entry() for _ in range(30)]
    dlq = fill(bare_store, entries)
    publisher = Recorder(delay=0.005)
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def reprocess(name: str) -> None:
        store = Store(bare_store.url, bare_store.keys.prefix)  # a process's own client
        reprocessor = build(store, publisher, by=name)
        start.wait()
        results[name] = reprocessor.run(now=T0 + 3600)

    threads = [threading.Thread(target=reprocess, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    sent = Counter(s["kwargs"]["payment_id"] for s in publisher.sent)
    assert sorted(sent.values()) == [1] * 30
    assert sum(r.actions["redrive"] for r in results.values()) == 30
    # The two runs raced: claims another run held were skipped, not redriven twice.
    assert sum(r.actions["skip"] for r in results.values()) > 0
    ledger = Counter(r["detail"] for r in redriven_records(bare_store))
    assert ledger == Counter(f"dlq {e.id}" for e in entries)
    assert dlq.count() == 0


def test_a_dry_run_changes_nothing_and_predicts_the_real_run(bare_store: Store) -> None:
    entries = [charge_entry() for _ in range(3)] + [charge_entry(c) for c in HELD]
    entries.append(charge_entry(last_failure_at=T0 + 3590))  # not due yet
    fill(bare_store, entries)
    limit = RateLimit(name="reprocess-dry", kind="sliding", max_requests=2, window_seconds=60)
    breaker = BreakerRegistry(bare_store).get("payment")
    breaker.snapshot()  # the breaker's hash exists, as in a running fleet
    gates = lambda name: TaskGates(breaker="payment", limits=(limit,))  # noqa: E731
    publisher, alerts = Recorder(), Alerts()
    client = redis.Redis.from_url(bare_store.url)  # DUMP replies are bytes

    def everything() -> dict[str, Any]:
        keys = sorted(client.scan_iter(match=f"{bare_store.keys.prefix}*"))
        return {k: (client.type(k), client.dump(k), client.pttl(k) > 0) for k in keys}

    before = everything()
    dry = build(bare_store, publisher, gates=gates, hooks=alerts).run(dry_run=True, now=T0 + 3600)
    assert everything() == before
    assert publisher.sent == [] and alerts.seen == []
    assert (dry.actions["redrive"], dry.actions["hold"], dry.actions["wait"]) == (2, 4, 2)
    assert dry.alerted == 4 and dry.dry_run

    real = build(bare_store, publisher, gates=gates, hooks=alerts).run(now=T0 + 3600)
    assert real.summary() | {"dry_run": True} == dry.summary()
    assert len(publisher.sent) == 2 and len(alerts.seen) == 4


def test_a_failed_publish_keeps_the_entry_and_releases_its_claim(bare_store: Store) -> None:
    entries = [charge_entry() for _ in range(3)]
    dlq = fill(bare_store, entries)

    broken = build(bare_store, Recorder(fail=True)).run(now=T0 + 3600)
    assert broken.reasons == {"skip: publish failed": 1, "wait: publish failed this run": 2}
    assert dlq.count() == 3 and redriven_records(bare_store) == []
    publisher = Recorder()
    assert build(bare_store, publisher).run(now=T0 + 3600).actions["redrive"] == 3
    assert len(publisher.sent) == 3 and dlq.count() == 0


def test_entries_are_grouped_by_error_fingerprint_and_alerts_are_masked(bare_store: Store) -> None:
    timeouts = [
        charge_entry(exception_message=f"timeout after {s}.{s}s talking to 10.0.0.{s}:443")
        for s in (3, 17, 250)
    ]
    refused = charge_entry(
        "permanent",
        exception_type="PermanentError",
        exception_message=f"402 card declined for token {SECRET}",
    )
    dlq = fill(bare_store, [*timeouts, refused])
    alerts = Alerts()

    result = build(bare_store, Recorder(), hooks=alerts).run(dry_run=False, now=T0 + 3600)

    fp = timeouts[0].fingerprint
    assert {e.fingerprint for e in timeouts} == {fp} != {refused.fingerprint}
    assert result.fingerprints[fp]["entries"] == result.fingerprints[fp]["redrive"] == 3
    assert result.fingerprints[refused.fingerprint] | {"label": ""} == {
        "label": "",
        "entries": 1,
        "hold": 1,
    }
    assert [e.id for e in dlq.iter(Filter(fingerprint=refused.fingerprint))] == [refused.id]
    [(event, message, context)] = alerts.seen
    assert SECRET not in repr((event, message, context)) and "***" in context["error"]
    assert SECRET not in repr(result.to_dict())
    assert context["fingerprint"] == refused.fingerprint


@pytest.mark.parametrize("mode", [BreakerMode.DISABLED, BreakerMode.SHADOW])
def test_a_breaker_that_never_refuses_does_not_hold_redrives_back(
    bare_store: Store, mode: BreakerMode
) -> None:
    fill(bare_store, [charge_entry()])
    breaker = BreakerRegistry(bare_store).get("payment")
    for _ in range(breaker.config.failure_threshold):
        breaker.record("probe", TransientError("503"), 0.01)
    assert breaker.snapshot()["state"] == "open"
    breaker.set_mode(mode)
    gates = lambda name: TaskGates(breaker="payment")  # noqa: E731
    assert build(bare_store, Recorder(), gates=gates).run(now=T0 + 3600).actions["redrive"] == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RELIABLE_REPROCESS__MAX_PER_RUN", "0"),
        ("RELIABLE_REPROCESS__BACKOFF_BASE_SECONDS", "-1"),
        ("RELIABLE_REPROCESS__CLAIM_SECONDS", "soon"),
    ],
)
def test_a_bad_reprocess_setting_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    for name in [n for n in os.environ if n.upper().startswith("RELIABLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert f"{variable}: " in str(refused.value) and f"(got '{value}')" in str(refused.value)
