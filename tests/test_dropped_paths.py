"""Nothing dropped before our pipeline runs: one test per way Celery acks or drops a message.

Celery acks or discards some messages before (or around) any task code: an unknown task
name, a refused pickle, an undecodable body, a message of no known format, a revoked or
expired message, a passed or unreadable ``deadline``, a hard time limit, a lost pool
child, arguments that fail validation, a message redelivered too often. For each path
the test proves the DLQ entry (or the explicit ``revoked`` ledger outcome) was written,
with its failure class and reason, and that the message left the broker for good (no
queued or unacked copy remains, so it cannot be redelivered forever).

All paths share one worker (started with ``max_redeliveries=2`` for the redelivery cap;
every other path is unaffected by it). Tests run one after another and each waits for
its own outcome, so a killed pool child never overlaps another test's task.
"""

from __future__ import annotations

import base64
import json
import pickletools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, delete_prefix, wait_until
from tests.support.raw import protocol2_headers, publish_raw
from worker.sandbox import SandboxProvider

LEASE_TTL_SECONDS = 10.0  # the testing environment's lease TTL
MAX_REDELIVERIES = 2
WAIT_SECONDS = 20.0


@dataclass
class Fleet:
    environment: Environment
    worker: WorkerProcess
    sandbox: SandboxProvider
    store: Store
    producer: Celery

    @property
    def dlq(self) -> DeadLetterQueue:
        return DeadLetterQueue(self.store)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.store)

    def dead_letters(self, task_id: str) -> list[DeadLetter]:
        return [e for e in self.dlq.iter() if e.task_id == task_id]

    def wait_dead_letter(self, task_id: str) -> DeadLetter:
        entries = wait_until(
            lambda: self.dead_letters(task_id), WAIT_SECONDS, message=f"a DLQ entry for {task_id}"
        )
        return entries[0]

    def outcomes(self, task_id: str) -> list[str]:
        return self.ledger.outcomes([task_id]).get(task_id, [])

    def wait_outcome(self, task_id: str, outcome: str) -> list[str]:
        return wait_until(
            lambda: outcome in self.outcomes(task_id) and self.outcomes(task_id),
            WAIT_SECONDS,
            message=f"ledger outcome {outcome} for {task_id}",
        )

    def broker_copies(self) -> int:
        """Messages of this environment still queued or delivered-but-unacked on the broker."""
        client = redis.Redis.from_url(self.environment.redis_url)
        prefix = self.environment.broker_prefix
        queued = sum(
            client.llen(key)
            for key in client.scan_iter(match=f"{prefix}{self.environment.queue}*", _type="list")
        )
        return int(queued) + int(client.hlen(f"{prefix}unacked"))

    def assert_message_gone(self) -> None:
        """No copy is queued or unacked: nothing is left that could be redelivered."""
        wait_until(
            lambda: self.broker_copies() == 0,
            WAIT_SECONDS,
            message="no queued or unacked message left on the broker",
        )

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The worker's JSON log lines whose event is ``event``."""
        found = []
        for line in self.worker.log_text().splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                record = json.loads(line)
                if record.get("event") == event:
                    found.append(record)
        return found

    def calls(self, key: str, endpoint: str = "webhooks") -> list[dict[str, Any]]:
        return [
            c
            for c in self.sandbox.effects(endpoint=endpoint)
            if (c["body"] or {}).get("key") == key
        ]

    def counter(self, name: str, key: str) -> int:
        return int(self.store.client.get(f"{self.environment.prefix}:test:{name}:{key}") or 0)

    def publish_raw(self, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
        """Publish bytes as they are onto the worker's queue, bypassing Celery's serializer."""
        publish_raw(self.producer, self.environment.queue, body, headers, content_type)


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[Fleet]:
    with SandboxProvider().start() as sandbox:
        environment = Environment(redis_url=redis_url, sandbox_url=sandbox.url)
        worker = WorkerProcess(
            environment, concurrency=2, RELIABLE_DELIVERY__MAX_REDELIVERIES=str(MAX_REDELIVERIES)
        )
        try:
            with worker:
                yield Fleet(
                    environment,
                    worker,
                    sandbox,
                    Store(redis_url, environment.prefix),
                    environment.producer(),
                )
        finally:
            delete_prefix(redis_url, environment.prefix)


@pytest.fixture
def idle_fleet(fleet: Fleet) -> Fleet:
    """The shared fleet, with no message of an earlier test left on the broker."""
    fleet.assert_message_gone()
    return fleet


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


class TouchOnUnpickle:
    """Unpickling this creates ``path``: proof that a body was (or was not) deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return Path.touch, (self.path,)


# -- messages Celery's consumer would drop --------------------------------------------------


def test_an_unknown_task_name_is_dead_lettered_as_poison_with_its_arguments(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    sent = fleet.producer.send_task(
        "no.such.task",
        args=[1, "two"],
        kwargs={"three": 3},
        headers={"correlation_id": "corr-unknown"},
    )

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason == "unknown task 'no.such.task': not registered"
    assert entry.task_name == "no.such.task"
    assert (entry.args, entry.kwargs) == ([1, "two"], {"three": 3})
    assert entry.correlation_id == "corr-unknown"
    assert entry.raw_body is None
    assert fleet.outcomes(sent.id) == ["dead_lettered"]
    wait_until(lambda: sent.state == "FAILURE", WAIT_SECONDS, message="NotRegistered result")


def test_a_pickled_message_is_dead_lettered_as_poison_and_never_unpickled(
    idle_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = idle_fleet
    pickler = fleet.environment.producer()
    pickler.conf.update(accept_content=["json", "pickle"], task_serializer="pickle")
    marker = tmp_path / f"unpickled-{uuid.uuid4().hex[:8]}"
    sent = pickler.send_task("test.echo", args=[TouchOnUnpickle(marker)], serializer="pickle")

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason == (
        "invalid task message (application/x-python-serialize): Refusing to deserialize"
        " untrusted content of type pickle (application/x-python-serialize)"
    )
    assert entry.exception_type == "ContentDisallowed"
    assert (entry.task_name, entry.args, entry.kwargs) == ("test.echo", [], {})
    raw = base64.b64decode(entry.raw_body or "")
    # The kept bytes are the pickle as sent: read opcode by opcode, never executed.
    strings = [arg for _, arg, _ in pickletools.genops(raw) if isinstance(arg, str)]
    assert "Path.touch" in strings and marker.name in strings
    assert not marker.exists()
    assert fleet.outcomes(sent.id) == ["dead_lettered"]


def test_an_undecodable_json_body_is_dead_lettered_as_poison_with_the_raw_bytes(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    task_id = str(uuid.uuid4())
    body = b'[["half a message",'
    fleet.publish_raw(body, "application/json", protocol2_headers("test.echo", task_id))

    entry = fleet.wait_dead_letter(task_id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(task_id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason.startswith("undecodable body (application/json): ")
    assert entry.exception_type == "DecodeError"
    assert entry.task_name == "test.echo"
    assert base64.b64decode(entry.raw_body or "") == body
    assert fleet.outcomes(task_id) == ["dead_lettered"]


def test_a_message_of_unknown_format_is_dead_lettered_as_poison(idle_fleet: Fleet) -> None:
    # Observed: with no `task` header Celery decodes the body as protocol 1; a body that
    # is no protocol-1 task either reaches `on_unknown_message`, and nothing else.
    fleet = idle_fleet
    task_id = str(uuid.uuid4())
    body = json.dumps({"hello": task_id}).encode()
    fleet.publish_raw(body, "application/json", {"id": task_id})

    entry = fleet.wait_dead_letter(task_id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(task_id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason == "message of unknown format (no task header)"
    assert entry.task_name == "<unknown>"
    assert base64.b64decode(entry.raw_body or "") == body
    assert fleet.outcomes(task_id) == ["dead_lettered"]


# -- messages the worker's parent settles before the body runs ------------------------------


def test_a_revoked_task_is_recorded_as_revoked_and_never_runs(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    task_id, key = str(uuid.uuid4()), unique("revoked")
    replies = fleet.producer.control.revoke(task_id, reply=True, limit=1, timeout=5)
    assert len(replies) == 1  # the one worker now holds the id in its revoked set

    sent = fleet.producer.send_task("test.call", kwargs={"key": key}, task_id=task_id)

    fleet.wait_outcome(task_id, "revoked")
    fleet.assert_message_gone()
    assert fleet.outcomes(task_id) == ["revoked"]
    assert fleet.dead_letters(task_id) == []
    assert fleet.calls(key) == []
    wait_until(lambda: sent.state == "REVOKED", WAIT_SECONDS, message="REVOKED result")
    logged = [e for e in fleet.log_events("task_revoked") if e.get("task_id") == task_id]
    assert [(e["task_name"], e["reason"]) for e in logged] == [("test.call", "revoked")]


def test_an_expired_message_is_dead_lettered_as_expired_and_never_runs(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    key = unique("expires")
    sent = fleet.producer.send_task(
        "test.call", kwargs={"key": key}, expires=datetime.now(UTC) - timedelta(minutes=1)
    )

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "expired"
    assert entry.reason == "message expired before it ran (expired)"
    assert entry.exception_type == "DeadlineExceeded"
    assert entry.kwargs == {"key": key}
    assert fleet.calls(key) == []
    assert fleet.outcomes(sent.id) == ["dead_lettered"]


def test_a_passed_deadline_is_dead_lettered_as_expired_and_never_runs(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    key = unique("deadline")
    deadline = (datetime.now(UTC) - timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    sent = fleet.producer.send_task(
        "test.call", kwargs={"key": key}, headers={"deadline": deadline}
    )

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "expired"
    assert entry.reason.startswith(f"deadline {deadline} passed ")
    assert entry.reason.endswith("s before the task started")
    assert entry.headers["deadline"] == deadline
    assert fleet.calls(key) == []
    assert fleet.outcomes(sent.id) == ["dead_lettered"]


def test_an_unreadable_deadline_is_dead_lettered_as_poison_and_never_runs(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    key = unique("bad-deadline")
    sent = fleet.producer.send_task(
        "test.call", kwargs={"key": key}, headers={"deadline": "next tuesday"}
    )

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason == "deadline header 'next tuesday' is not ISO-8601"
    assert fleet.calls(key) == []
    assert fleet.outcomes(sent.id) == ["dead_lettered"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"amount": -5, "currency": "EUR"}, "amount"),
        ({"amount": 500, "currency": "eur"}, "currency"),
    ],
)
def test_arguments_failing_validation_are_dead_lettered_as_poison_naming_the_field(
    idle_fleet: Fleet, kwargs: dict[str, Any], field: str
) -> None:
    fleet = idle_fleet
    payment_id = unique("pay")
    sent = fleet.producer.send_task("payments.charge", kwargs={"payment_id": payment_id, **kwargs})

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason.startswith(f"invalid arguments: {field}: ")
    assert entry.kwargs == {"payment_id": payment_id, **kwargs}
    assert [
        c
        for c in fleet.sandbox.effects(endpoint="charges")
        if (c["body"] or {}).get("payment_id") == payment_id
    ] == []
    assert fleet.outcomes(sent.id) == ["dead_lettered"]


# -- endings seen only by the worker's parent: time limit, lost child, redelivery cap --------


def test_a_hard_time_limit_is_retried_then_dead_lettered_as_transient(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    key = unique("hard-limit")
    # The body swallows its soft limit, so the hard limit (1 s) is what ends each attempt.
    sent = fleet.producer.send_task(
        "test.stubborn_sleep", kwargs={"key": key, "seconds": 30}, time_limit=1, soft_time_limit=0.5
    )

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "transient"
    assert entry.exception_type == "TimeLimitExceeded"
    # billiard's TimeLimitExceeded renders its args tuple in str().
    assert entry.reason == "TimeLimitExceeded('hard time limit (1.0s) exceeded',)"
    assert entry.attempts == 3
    assert fleet.outcomes(sent.id) == ["retried", "retried", "dead_lettered"]
    assert fleet.counter("stubborn", key) == 3


def test_a_lost_pool_child_releases_the_lease_and_its_task_completes_before_the_lease_ttl(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    key = unique("crash-once")
    started = time.monotonic()
    sent = fleet.producer.send_task("test.crash", kwargs={"key": key, "times": 1})

    assert sent.get(timeout=WAIT_SECONDS) == key
    elapsed = time.monotonic() - started
    fleet.assert_message_gone()

    # The redelivered copy ran at once: it did not wait for the dead child's lease to lapse.
    assert elapsed < LEASE_TTL_SECONDS
    assert fleet.outcomes(sent.id) == ["requeued", "succeeded"]
    lost = [e for e in fleet.log_events("task_child_lost_requeued") if e["task_id"] == sent.id]
    assert [e["lease_released"] for e in lost] == [True]
    assert fleet.counter("crash", key) == 2
    assert fleet.dead_letters(sent.id) == []


def test_a_message_redelivered_too_often_is_dead_lettered_as_poison(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    key = unique("crash-always")
    sent = fleet.producer.send_task("test.crash", kwargs={"key": key, "times": 100})

    entry = fleet.wait_dead_letter(sent.id)
    fleet.assert_message_gone()

    assert len(fleet.dead_letters(sent.id)) == 1
    assert entry.failure_class == "poison"
    assert entry.reason == f"redelivered 3 times (max redeliveries {MAX_REDELIVERIES})"
    assert fleet.counter("crash", key) == 3  # the first delivery and two redeliveries ran
    assert fleet.outcomes(sent.id) == ["requeued", "requeued", "requeued", "dead_lettered"]
