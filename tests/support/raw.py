"""Raw messages for tests that play a hostile producer: bytes straight onto a queue."""

from __future__ import annotations

from typing import Any

import kombu
from celery import Celery


def publish_raw(
    producer: Celery,
    queue_name: str,
    body: bytes,
    headers: dict[str, Any],
    content_type: str = "application/json",
) -> None:
    """Publish bytes as they are onto ``queue_name``, bypassing Celery's serializer."""
    queue = producer.amqp.queues[queue_name]
    with producer.connection_for_write() as connection:
        kombu.Producer(connection).publish(
            body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            content_type=content_type,
            content_encoding="utf-8",
            headers=headers,
            declare=[queue],
        )


def protocol2_headers(task: str, task_id: str, **extra: Any) -> dict[str, Any]:
    """Celery protocol-2 headers as a plain Celery producer writes them."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "timelimit": [None, None],
        "eta": None,
        "expires": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "test",
        **extra,
    }
