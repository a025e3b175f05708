"""Poison a producer can send that looks almost right: each is dead-lettered before anything
runs, answers its producer, and keeps its secrets.

* A body whose third element (Celery's "embed": callbacks, errbacks, chain, chord) is not
  what Celery writes was lost (a ``TypeError`` in the pool's callback, no record at all),
  or ran its body and then stored FAILURE, or published garbage messages. It is poison.
* An empty item on the queue (``LPUSH queue ""``) stayed in the worker's processing list
  forever. It is poison (``empty``).
* A message dead-lettered before it ran (refused content type, undecodable, malformed)
  left its producer's ``AsyncResult.get()`` waiting for its timeout: it now gets a
  FAILURE result (``PoisonMessage`` with the DLQ entry's reason).
* Celery's own log lines about a dropped message printed its body and headers in clear,
  and an undecodable body of a task with ``sensitive_args`` was kept raw in the DLQ.

One prefork worker serves every test; each waits for its own outcome with a bounded wait.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.errors import PoisonMessage
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from tests.support.raw import protocol2_headers, publish_raw
from worker.sandbox import SandboxProvider

WAIT_SECONDS = 20.0
INVALID = "invalid task message (application/json): malformed task message: "


@dataclass
class Fleet:
    environment: Environment
    worker: WorkerProcess
    sandbox: SandboxProvider
    store: Store
    producer: Celery

    @property
    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.environment.redis_url)

    def dead_letters(self, task_id: str) -> list[DeadLetter]:
        return [e for e in DeadLetterQueue(self.store).iter() if e.task_id == task_id]

    def wait_dead_letter(self, task_id: str) -> DeadLetter:
        entries = wait_until(
            lambda: self.dead_letters(task_id), WAIT_SECONDS, message=f"a DLQ entry for {task_id}"
        )
        return entries[0]

    def outcomes(self, task_id: str) -> list[str]:
        return Ledger(self.store).outcomes([task_id]).get(task_id, [])

    def broker_copies(self) -> int:
        """Items of this environment queued, in a processing list, or delivered unacked."""
        prefix = self.environment.broker_prefix
        lists = sum(
            self.client.llen(key)
            for key in self.client.scan_iter(
                match=f"{prefix}{self.environment.queue}*", _type="list"
            )
        )
        return int(lists) + int(self.client.hlen(f"{prefix}unacked"))

    def assert_message_gone(self) -> None:
        wait_until(
            lambda: self.broker_copies() == 0,
            WAIT_SECONDS,
            message="no queued, processing or unacked item left on the broker",
        )

    def calls(self, key: str) -> list[dict[str, Any]]:
        return [
            c
            for c in self.sandbox.effects(endpoint="webhooks")
            if (c["body"] or {}).get("key") == key
        ]

    def publish_raw(
        self, body: bytes, headers: dict[str, Any], content_type: str = "application/json"
    ) -> None:
        """Bytes as they are onto the worker's queue, bypassing Celery's serializer."""
        publish_raw(self.producer, self.environment.queue, body, headers, content_type)

    def result_error(self, task_id: str) -> BaseException:
        """What the producer's ``AsyncResult.get()`` raises for this task id."""
        with pytest.raises(Exception) as caught:
            AsyncResult(task_id, app=self.producer).get(timeout=WAIT_SECONDS)
        return caught.value


@pytest.fixture(scope="module")
def fleet(shared_env: Environment, shared_sandbox: SandboxProvider) -> Iterator[Fleet]:
    worker = WorkerProcess(shared_env, concurrency=2)
    with worker:
        yield Fleet(
            shared_env,
            worker,
            shared_sandbox,
            Store(shared_env.redis_url, shared_env.prefix),
            shared_env.producer(),
        )


@pytest.fixture
def idle_fleet(fleet: Fleet) -> Fleet:
    fleet.assert_message_gone()
    return fleet


def headers_for(task: str, task_id: str) -> dict[str, Any]:
    """Protocol-2 headers as a plain Celery producer writes them."""
    return protocol2_headers(task, task_id, ignore_result=False)


def body(args: list[Any], kwargs: dict[str, Any], embed: Any) -> bytes:
    return json.dumps([args, kwargs, embed]).encode()


CELERY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
NOT_A_LIST = "is not a list of task signatures (objects with a 'task' name)"


@pytest.mark.parametrize(
    ("embed", "problem"),
    [
        ("x", "the body's third element (callbacks, chain, ...) is a str, not an object"),
        ([1], "the body's third element (callbacks, chain, ...) is a list, not an object"),
        ({**CELERY_EMBED, "callbacks": "zz"}, f"'callbacks' {NOT_A_LIST}"),
        ({**CELERY_EMBED, "errbacks": "zz"}, f"'errbacks' {NOT_A_LIST}"),
        ({**CELERY_EMBED, "chain": "zz"}, f"'chain' {NOT_A_LIST}"),
        ({"callbacks": [{"args": []}]}, f"'callbacks' {NOT_A_LIST}"),
        (
            {**CELERY_EMBED, "chord": "zz"},
            "'chord' is not a task signature (an object with a 'task' name)",
        ),
        ({**CELERY_EMBED, "id": "forged"}, "the body's third element has an unknown key 'id'"),
    ],
    ids=[
        "str",
        "list",
        "callbacks-str",
        "errbacks-str",
        "chain-str",
        "callback-no-task",
        "chord-str",
        "unknown-key",
    ],
)
def test_a_body_whose_embed_is_not_celery_s_is_dead_lettered_as_poison_and_never_runs(
    idle_fleet: Fleet, embed: Any, problem: str
) -> None:
    fleet = idle_fleet
    task_id, key = str(uuid.uuid4()), f"embed-{uuid.uuid4().hex[:8]}"
    fleet.publish_raw(body([], {"key": key}, embed), headers_for("test.call", task_id))

    entry = fleet.wait_dead_letter(task_id)
    fleet.assert_message_gone()  # nothing requeued, nothing published for a task 'z'

    assert len(fleet.dead_letters(task_id)) == 1
    assert (entry.failure_class, entry.reason) == ("poison", INVALID + problem)
    assert (entry.task_name, entry.args, entry.kwargs) == ("test.call", [], {"key": key})
    assert fleet.outcomes(task_id) == ["dead_lettered"]
    assert fleet.calls(key) == []
    error = fleet.result_error(task_id)
    assert (type(error).__name__, str(error)) == ("PoisonMessage", entry.reason)


@pytest.mark.parametrize("embed", [CELERY_EMBED, None, {}], ids=["celery", "null", "empty"])
def test_a_body_with_celery_s_embed_runs_once(idle_fleet: Fleet, embed: Any) -> None:
    fleet = idle_fleet
    task_id, key = str(uuid.uuid4()), f"ok-{uuid.uuid4().hex[:8]}"
    fleet.publish_raw(body([], {"key": key}, embed), headers_for("test.call", task_id))

    AsyncResult(task_id, app=fleet.producer).get(timeout=WAIT_SECONDS)

    assert len(fleet.calls(key)) == 1
    assert fleet.outcomes(task_id) == ["succeeded"]
    assert fleet.dead_letters(task_id) == []


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{}", "the body is a JSON object, not [args, kwargs, embed]"),
        (b"[]", "the body is a list of 0, not [args, kwargs, embed]"),
        (b"[[], {}]", "the body is a list of 2, not [args, kwargs, embed]"),
        (b'"text"', "the body is a JSON string, not [args, kwargs, embed]"),
        (b"null", "the body is a JSON null, not [args, kwargs, embed]"),
        (b"7", "the body is a JSON number, not [args, kwargs, embed]"),
    ],
    ids=["object", "empty-list", "two", "string", "null", "number"],
)
def test_a_body_that_is_not_args_kwargs_embed_is_poison_in_one_log_line(
    idle_fleet: Fleet, raw: bytes, problem: str
) -> None:
    fleet = idle_fleet
    task_id = str(uuid.uuid4())
    pid, logged = fleet.worker.pid, len(fleet.worker.log_text())
    fleet.publish_raw(raw, headers_for("test.call", task_id))

    entry = fleet.wait_dead_letter(task_id)
    fleet.assert_message_gone()
    assert len(fleet.dead_letters(task_id)) == 1
    assert (entry.failure_class, entry.reason) == ("poison", INVALID + problem)
    assert fleet.worker.pid == pid
    since = fleet.worker.log_text()[logged:]
    assert "Traceback" not in since and "task_message_handler_failed" not in since


def test_an_empty_item_on_the_queue_is_dead_lettered_as_poison_and_leaves_no_copy(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    pid = fleet.worker.pid
    dlq = DeadLetterQueue(fleet.store)
    before = {e.id for e in dlq.iter()}
    fleet.client.lpush(fleet.environment.broker_prefix + fleet.environment.queue, b"")

    new = wait_until(
        lambda: [e for e in dlq.iter() if e.id not in before],
        WAIT_SECONDS,
        message="the empty item dead-lettered",
    )
    fleet.assert_message_gone()  # not in the queue, the processing list or unacked

    assert len(new) == 1
    [entry] = new
    assert (entry.failure_class, entry.reason) == (
        "poison",
        "empty: an empty item (no message at all)",
    )
    assert (entry.raw_body, entry.raw_size) == ("", 0)
    assert fleet.worker.pid == pid and fleet.worker.proc is not None
    assert fleet.worker.proc.poll() is None


def test_a_refused_pickle_answers_its_producer_with_a_poison_failure(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    pickler = fleet.environment.producer()
    pickler.conf.update(accept_content=["json", "pickle"], task_serializer="pickle")
    sent = pickler.send_task("test.echo", args=["pickled"], serializer="pickle")

    entry = fleet.wait_dead_letter(sent.id)
    error = fleet.result_error(sent.id)

    assert isinstance(error, PoisonMessage)  # the test process can import the class
    assert (
        str(error)
        == entry.reason
        == (
            "invalid task message (application/x-python-serialize): Refusing to deserialize"
            " untrusted content of type pickle (application/x-python-serialize)"
        )
    )
    assert fleet.outcomes(sent.id) == ["dead_lettered"]


def test_an_undecodable_body_answers_its_producer_with_a_poison_failure(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    task_id = str(uuid.uuid4())
    fleet.publish_raw(b'[["half a message",', headers_for("test.echo", task_id))

    entry = fleet.wait_dead_letter(task_id)
    error = fleet.result_error(task_id)

    assert entry.reason.startswith("undecodable body (application/json): ")
    assert (type(error).__name__, str(error)) == ("PoisonMessage", entry.reason)
    assert entry.raw_size == len(b'[["half a message",')


def test_a_poison_message_that_wants_no_result_gets_none(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    task_id, key = str(uuid.uuid4()), f"quiet-{uuid.uuid4().hex[:8]}"
    fleet.publish_raw(
        body([], {"key": key}, "x"), {**headers_for("test.call", task_id), "ignore_result": True}
    )

    fleet.wait_dead_letter(task_id)
    fleet.assert_message_gone()

    meta = fleet.client.get(f"{fleet.environment.broker_prefix}celery-task-meta-{task_id}")
    assert meta is None


# -- secrets in what Celery logs and what the DLQ keeps of a dropped message ---------------

OTP = "otp-4Fq9-zZ71-secret"  # matches no pattern: only cutting Celery's dump hides it


def test_celery_s_dump_of_an_unknown_task_is_cut_from_the_log(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    sent = fleet.producer.send_task("no.such.task", args=[OTP], kwargs={"password": "pw-" + OTP})

    entry = fleet.wait_dead_letter(sent.id)
    wait_until(
        lambda: "Received unregistered task" in fleet.worker.log_text(),
        WAIT_SECONDS,
        message="Celery's unregistered-task line",
    )

    log = fleet.worker.log_text()
    lines = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and "Received unregistered task" in line
    ]
    assert [line["event"] for line in lines] == [
        "Received unregistered task of type 'no.such.task'. [message body not logged]"
    ]
    assert OTP not in log
    assert entry.kwargs == {"password": "***"}


def test_an_undecodable_body_of_a_task_with_sensitive_args_keeps_no_raw_bytes(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    task_id = str(uuid.uuid4())
    raw = b'[["user-1", "email", "' + OTP.encode() + b' \xff"], {}, {}]'  # not UTF-8
    fleet.publish_raw(raw, headers_for("notifications.send", task_id))

    entry = fleet.wait_dead_letter(task_id)
    wait_until(
        lambda: "Can't decode message body" in fleet.worker.log_text(),
        WAIT_SECONDS,
        message="Celery's decode-error line",
    )

    assert entry.reason.startswith("undecodable body (application/json): ")
    assert (entry.raw_body, entry.raw_size) == (None, len(raw))
    assert OTP not in entry.to_json()
    log = fleet.worker.log_text()
    assert OTP not in log
    decode_lines = [
        json.loads(line)["event"]
        for line in log.splitlines()
        if line.startswith("{") and "Can't decode message body" in line
    ]
    assert decode_lines and all(e.endswith(" [message body not logged]") for e in decode_lines)
    error = fleet.result_error(task_id)
    assert OTP not in str(error)


def test_a_malformed_message_of_a_task_with_sensitive_args_is_logged_without_its_body(
    idle_fleet: Fleet,
) -> None:
    fleet = idle_fleet
    task_id = str(uuid.uuid4())
    fleet.publish_raw(
        body(["user-2", "email", OTP], {}, "x"), headers_for("notifications.send", task_id)
    )

    entry = fleet.wait_dead_letter(task_id)

    assert entry.args == ["user-2", "email", "***"]
    assert entry.masked_args == ["message"]
    assert OTP not in fleet.worker.log_text()
    assert OTP not in entry.to_json()


def test_a_card_number_as_idempotency_key_never_appears_in_a_key_name(idle_fleet: Fleet) -> None:
    fleet = idle_fleet
    card, key = "4012888888881881", f"card-{uuid.uuid4().hex[:8]}"
    sent = fleet.producer.send_task(
        "test.call", kwargs={"key": key}, headers={"idempotency_key": card}
    )

    sent.get(timeout=WAIT_SECONDS)

    names = list(fleet.client.scan_iter(match=f"{fleet.environment.prefix}*"))
    assert names and not [k for k in names if card.encode() in k]
    assert len(fleet.calls(key)) == 1
