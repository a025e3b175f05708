"""The transport and consumer the README describes are in effect for every broker URL form.

kombu picks its own Redis transport from a URL's ``redis+socket://`` prefix, ignoring
the configured one; the worker therefore names its transport for every Redis form. The
live checks push an item that is no message at all onto a worker's queue: with kombu's
stock transport it would stop the worker, with ours it is dead-lettered as poison.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from config import load_settings
from reliability.dlq import DeadLetterQueue
from reliability.store import Store
from reliability.transport import Transport
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.celeryconfig import celery_config
from worker.embedded import stop_embedded_redis

CONSUMER = "reliability.consumer:ReliableConsumer"


@pytest.mark.parametrize(
    "url, ours",
    [
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://:pw@127.0.0.1:6380/0?ssl_cert_reqs=none", True),
        ("redis+socket:///tmp/reliable-test.sock", True),
        ("unix:///tmp/reliable-test.sock", True),
        ("amqp://guest:guest@127.0.0.1:5672//", False),
    ],
)
def test_every_accepted_broker_url_form_uses_our_transport_and_consumer(
    url: str, ours: bool
) -> None:
    from celery import Celery

    settings = load_settings(redis={"url": "redis://127.0.0.1:6379/0"}, broker={"url": url})
    app = Celery("url-form", set_as_current=False)
    app.conf.update(celery_config(settings, "redis://127.0.0.1:6379/0"))
    transport = app.connection_for_read().transport  # resolves the class, connects nothing
    assert (type(transport) is Transport) is ours
    assert app.conf.worker_consumer == CONSUMER
    if not ours:
        assert type(transport).__module__ == "kombu.transport.pyamqp"


@pytest.fixture
def socket_redis() -> Iterator[str]:
    from worker.embedded import ensure_embedded_redis

    directory = Path(tempfile.mkdtemp(prefix="reliable-sock-"))
    url = ensure_embedded_redis(directory)
    yield url
    stop_embedded_redis(directory)


def test_a_worker_on_a_unix_socket_dead_letters_an_item_that_is_no_message(
    socket_redis: str,
) -> None:
    environment = Environment(redis_url=socket_redis)
    client = redis.Redis.from_url(socket_redis)
    with WorkerProcess(environment, concurrency=1) as worker:
        pid = worker.pid
        client.lpush(environment.broker_prefix + environment.queue, b"not json")
        dlq = DeadLetterQueue(Store(socket_redis, environment.prefix))
        entry = wait_until(lambda: dlq.page(), timeout=30, message="poison entry")[0]
        result = environment.producer().send_task("test.echo", args=["after"])
        assert result.get(timeout=30) == "after"  # still consuming
        assert worker.proc is not None and worker.proc.poll() is None and worker.pid == pid
    assert entry.failure_class == "poison" and entry.reason.startswith("not_json")
    assert "redis+socket" not in worker.log_text().split("[tasks]")[0]


@pytest.mark.rabbitmq
def test_a_worker_on_rabbitmq_dead_letters_a_body_that_is_no_message(
    redis_url: str, rabbitmq_url: str
) -> None:
    environment = Environment(redis_url=redis_url, broker_url=rabbitmq_url)
    with WorkerProcess(environment, concurrency=1) as worker:
        with Connection(rabbitmq_url) as conn:
            queue = Queue(
                environment.queue, Exchange(environment.queue, "direct"), environment.queue
            )
            Producer(conn).publish(
                b"\xff\xfe not json",
                exchange=queue.exchange,
                routing_key=environment.queue,
                declare=[queue],
                content_type="application/json",
                content_encoding="binary",
                headers={"task": "test.echo", "id": "raw-1"},
            )
        dlq = DeadLetterQueue(Store(redis_url, environment.prefix))
        entry = wait_until(lambda: dlq.page(), timeout=30, message="poison entry")[0]
        result = environment.producer().send_task("test.echo", args=["after"])
        assert result.get(timeout=30) == "after"
        assert worker.proc is not None and worker.proc.poll() is None
    assert entry.failure_class == "poison" and entry.raw_body
