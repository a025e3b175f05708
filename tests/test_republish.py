"""A copy the service publishes is the same work: the mover's and the DLQ redrive's alike.

The copy keeps the task, arguments and producer headers, the exchange, routing key and
priority, Celery's ``expires``, the producer's time limits and the workflow ids; the
mover's copy keeps the task id too. Read off the broker message (no worker) and off the
worker's request (``test.shape`` records how each delivery arrived).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult
from kombu import Connection, Exchange, Queue

from reliability.delivery import DEFER_ID
from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.ledger import Ledger
from reliability.republish import Copy, republish
from reliability.store import Store
from tests.support.fleet import ROOT, Environment, WorkerProcess, delete_prefix, wait_until

# What the producer sets on the original, none of it the worker's default.
PRIORITY = 7
TIME_LIMITS = [30, 20]  # (hard, soft) seconds; the test worker's defaults differ
HEADERS = {"correlation_id": "corr-shape", "tenant_id": "acme"}
# The fields a copy must keep, as the worker's request shows them.
SAME_WORK = (
    "exchange",
    "routing_key",
    "priority",
    "expires",
    "timelimit",
    "correlation_id",
    "idempotency_key",
    "deadline",
    "tenant_id",
)


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def in_an_hour() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def alternate_binding(env: Environment) -> Queue:
    """The worker's queue bound to an exchange and routing key of its own: a copy that
    lost either would reach it another way (or not at all), and show it."""
    return Queue(
        env.queue, Exchange(f"{env.name}-alt", type="direct"), routing_key=f"{env.name}-alt-key"
    )


def send_original(
    producer: Celery, env: Environment, key: str, fail_times: int, permanent: bool = False
) -> AsyncResult:
    binding = alternate_binding(env)
    return producer.send_task(
        "test.shape",
        args=[key, fail_times, permanent],
        exchange=binding.exchange.name,
        routing_key=binding.routing_key,
        declare=[binding],
        priority=PRIORITY,
        expires=in_an_hour(),
        time_limit=TIME_LIMITS[0],
        soft_time_limit=TIME_LIMITS[1],
        headers={**HEADERS, "idempotency_key": f"idem-{key}", "deadline": in_an_hour().isoformat()},
    )


def deliveries(store: Store, key: str) -> list[dict[str, Any]]:
    """How each delivery of ``test.shape`` for ``key`` arrived, in order."""
    return [
        json.loads(r) for r in store.client.lrange(f"{store.keys.prefix}:test:shape:{key}", 0, -1)
    ]


def same_work(delivery: dict[str, Any]) -> dict[str, Any]:
    return {name: delivery[name] for name in SAME_WORK}


def outcomes(store: Store, task_id: str) -> list[str]:
    return Ledger(store).outcomes([task_id]).get(task_id, [])


def dlq_retry(env: Environment, entry_id: str) -> str:
    """``reliable dlq retry <id>`` as an operator runs it; returns the new task id."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.dlq_cli", "retry", entry_id],
        cwd=ROOT,
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[-1]


# -- the copy's publish options (pure) -----------------------------------------------------


def test_a_copy_names_its_exchange_and_routing_key_and_drops_what_was_never_set() -> None:
    options = Copy(
        task="t",
        headers={
            "correlation_id": "c",
            "tenant_id": None,
            "x-other": "dropped",
            DEFER_ID: "d" * 32,
        },
        routing={"exchange": "ex", "routing_key": "rk", "priority": None},
    ).options()

    assert options == {
        "headers": {"correlation_id": "c", DEFER_ID: "d" * 32},
        "retries": 0,
        "exchange": "ex",
        "routing_key": "rk",
    }


def test_a_copy_from_the_default_exchange_names_its_queue_without_declaring_it() -> None:
    options = Copy(
        task="t",
        routing={"exchange": "", "routing_key": "billing", "priority": 0},
        expires="2030-01-01T00:00:00+00:00",
        time_limits=[None, 5.0],
        parent_id="p",
        root_id="r",
        task_id="id-1",
        retries=2,
    ).options()

    assert options == {
        "headers": {},
        "retries": 2,
        "queue": "billing",
        "declare": [],
        "priority": 0,
        "expires": "2030-01-01T00:00:00+00:00",
        "time_limit": None,
        "soft_time_limit": 5.0,
        "task_id": "id-1",
        "parent_id": "p",
        "root_id": "r",
    }


# -- the broker message --------------------------------------------------------------------


@pytest.fixture
def quiet_env(redis_url: str) -> Iterator[Environment]:
    """An environment with no worker: what is published stays on the broker to be read."""
    env = Environment(redis_url=redis_url)
    yield env
    delete_prefix(redis_url, env.prefix)


def test_a_copy_of_a_message_from_another_queue_is_published_to_that_queue_as_it_was(
    quiet_env: Environment,
) -> None:
    env = quiet_env
    other = f"{env.name}-billing"  # not the app's default queue
    expires = in_an_hour().isoformat()
    copy = Copy(
        task="test.shape",
        args=["k", 0],
        kwargs={"permanent": False},
        headers={**HEADERS, "x-other": "dropped"},
        routing={"exchange": "", "routing_key": other, "priority": 5},
        expires=expires,
        time_limits=[30.0, 20.0],
        parent_id="parent-1",
        root_id="root-1",
        task_id="task-1",
        retries=2,
    )

    assert republish(env.producer(), copy) == "task-1"

    client = Store(env.redis_url, env.prefix).client
    assert client.llen(f"{env.broker_prefix}{env.queue}") == 0
    lists = list(client.scan_iter(match=f"{env.broker_prefix}{other}*"))
    [raw] = [item for name in lists for item in client.lrange(name, 0, -1)]
    message = json.loads(raw)
    headers, properties = message["headers"], message["properties"]
    assert properties["delivery_info"] == {"exchange": "", "routing_key": other}
    assert properties["priority"] == 5
    assert (headers["id"], headers["retries"], headers["expires"], headers["timelimit"]) == (
        "task-1",
        2,
        expires,
        [30.0, 20.0],
    )
    assert (headers["parent_id"], headers["root_id"]) == ("parent-1", "root-1")
    assert {k: headers[k] for k in HEADERS} == HEADERS and "x-other" not in headers


@pytest.mark.rabbitmq
def test_on_rabbitmq_a_copy_from_the_default_exchange_reaches_its_queue_as_it_was(
    redis_url: str, rabbitmq_url: str
) -> None:
    env = Environment(redis_url=redis_url, broker_url=rabbitmq_url)
    queue = Queue(f"{env.name}-billing", durable=False)
    expires = in_an_hour().isoformat()
    copy = Copy(
        task="test.shape",
        args=["k", 0],
        headers=HEADERS,
        routing={"exchange": "", "routing_key": queue.name, "priority": 5},
        expires=expires,
        time_limits=[30.0, 20.0],
        task_id="task-1",
    )
    with Connection(rabbitmq_url) as connection:
        bound = queue.bind(connection.default_channel)
        bound.declare()  # by its consumers, with their arguments: the copy declares nothing
        try:
            assert republish(env.producer(), copy) == "task-1"
            message = wait_until(lambda: bound.get(no_ack=True), 10, message="the copy")
        finally:
            bound.delete()
    assert (message.delivery_info["exchange"], message.delivery_info["routing_key"]) == (
        "",
        queue.name,
    )
    assert message.properties["priority"] == 5
    assert (message.headers["id"], message.headers["expires"]) == ("task-1", expires)
    assert message.headers["timelimit"] == [30.0, 20.0]
    assert {k: message.headers[k] for k in HEADERS} == HEADERS


# -- the worker's request: the mover and the DLQ redrive -----------------------------------


@pytest.fixture(scope="module")
def worker(shared_env: Environment) -> Iterator[WorkerProcess]:
    with WorkerProcess(shared_env, concurrency=1) as process:
        yield process


def test_a_retry_republished_by_the_mover_arrives_as_the_original_did_and_runs_once(
    producer: Celery, shared_env: Environment, shared_store: Store, worker: WorkerProcess
) -> None:
    key = unique("mover")
    result = send_original(producer, shared_env, key, fail_times=1)

    assert result.get(timeout=30) == 2
    first, copy = deliveries(shared_store, key)
    binding = alternate_binding(shared_env)
    assert (first["exchange"], first["routing_key"], first["priority"], first["timelimit"]) == (
        binding.exchange.name,
        binding.routing_key,
        PRIORITY,
        TIME_LIMITS,
    )
    assert first["expires"] is not None
    assert same_work(copy) == same_work(first)
    assert (copy["task_id"], copy["retries"], copy["root_id"]) == (
        first["task_id"],
        1,
        first["root_id"],
    )
    assert outcomes(shared_store, result.id) == ["retried", "succeeded"]
    assert shared_store.client.zcard(shared_store.keys.parked) == 0  # no copy left to run


def test_a_dlq_entry_redriven_by_the_cli_arrives_with_its_envelope_and_runs_once(
    producer: Celery, shared_env: Environment, shared_store: Store, worker: WorkerProcess
) -> None:
    key = unique("entry")
    binding = alternate_binding(shared_env)
    with producer.connection_for_write() as connection:
        binding.declare(channel=connection.default_channel)
    expires = in_an_hour().isoformat()
    entry = DeadLetter(
        task_name="test.shape",
        task_id=unique("original"),
        failure_class="permanent",
        args=[key, 0],
        correlation_id=HEADERS["correlation_id"],
        tenant_id="acme",
        # Only the producer's headers are carried: not a parked copy's defer id.
        headers={**HEADERS, "idempotency_key": f"idem-{key}", DEFER_ID: "d" * 32},
        routing={
            "exchange": binding.exchange.name,
            "routing_key": binding.routing_key,
            "priority": PRIORITY,
        },
        expires=expires,
        time_limits=[30.0, 20.0],
        parent_id="parent-1",
        root_id="root-1",
    )
    dlq = DeadLetterQueue(shared_store)
    dlq.add(entry, Ledger(shared_store))

    new_id = dlq_retry(shared_env, entry.id)

    assert producer.AsyncResult(new_id).get(timeout=30) == 1
    [run] = deliveries(shared_store, key)
    assert same_work(run) == {
        "exchange": binding.exchange.name,
        "routing_key": binding.routing_key,
        "priority": PRIORITY,
        "expires": expires,
        "timelimit": TIME_LIMITS,
        **HEADERS,
        "idempotency_key": f"idem-{key}",
        "deadline": None,
    }
    assert (run["task_id"], run["retries"], run["parent_id"], run["root_id"]) == (
        new_id,
        0,
        "parent-1",
        "root-1",
    )
    assert (run["defer_id"], run["redrive_count"]) == (None, 1)
    assert outcomes(shared_store, new_id) == ["succeeded"]
    assert dlq.get(entry.id) is None


def test_a_dead_lettered_message_redriven_by_the_cli_arrives_as_the_original_did(
    producer: Celery, shared_env: Environment, shared_store: Store, worker: WorkerProcess
) -> None:
    key = unique("dead")
    result = send_original(producer, shared_env, key, fail_times=1, permanent=True)
    with pytest.raises(Exception) as failure:  # the type is asserted by name
        result.get(timeout=30)
    assert type(failure.value).__name__ == "PermanentError"
    [entry] = [e for e in DeadLetterQueue(shared_store).iter() if e.task_id == result.id]

    new_id = dlq_retry(shared_env, entry.id)

    assert producer.AsyncResult(new_id).get(timeout=30) == 2
    assert DeadLetterQueue(shared_store).get(entry.id) is None
    first, copy = deliveries(shared_store, key)
    assert (copy["task_id"], copy["retries"]) == (new_id, 0)
    assert outcomes(shared_store, new_id) == ["succeeded"]
    assert (copy["parent_id"], copy["root_id"]) == (first["parent_id"], first["root_id"])
    assert same_work(copy) == same_work(first)
