"""Whatever sits on a queue ends in the DLQ or runs: no item makes a worker exit.

Raw items of every shape are pushed straight onto the queue (as ``redis-cli LPUSH``
would) while a prefork worker consumes: not JSON, binary, JSON without kombu's envelope,
envelopes without Celery's headers, Celery messages with hostile headers or bodies,
items over the size limit. Each must end as exactly one final ledger record (a DLQ
entry or a run), the queue must drain, and the worker must keep its process id.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability.dlq import DeadLetterQueue
from reliability.ledger import FINAL, Ledger
from reliability.poison import Poison, check_item
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until

MAX_BYTES = 64 * 1024
TASKS = ("test.echo", "test.keyed_echo", "payments.charge", "no.such.task")


def envelope(task: str, args: Any, kwargs: Any, queue: str, **headers: Any) -> dict[str, Any]:
    """A kombu Redis envelope of a protocol-2 Celery message, as a producer writes it."""
    task_id = str(uuid.uuid4())
    body = json.dumps(
        [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": repr(kwargs),
            "origin": "test",
            "ignore_result": False,
            **headers,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
HEADER_NAMES = (
    "id",
    "task",
    "retries",
    "timelimit",
    "expires",
    "eta",
    "argsrepr",
    "idempotency_key",
    "deadline",
    "tenant_id",
    "correlation_id",
    "rel_defer",
    "rel_pub",
    "rel_first",
    "rel_reserved",
    "rel_redrive",
    "root_id",
    "shadow",
    "ignore_result",
)


@st.composite
def celery_items(draw: Any, queue: str) -> bytes:
    """A Celery message with one or two of its parts replaced by something hostile."""
    task = draw(st.sampled_from(TASKS))
    args = draw(st.sampled_from([["v"], [{"a": 1}], [], ["x", "y"]]))
    kwargs: Any = {}
    if task == "payments.charge":
        args, kwargs = (
            [],
            draw(
                st.sampled_from(
                    [
                        {"payment_id": f"p-{uuid.uuid4().hex[:8]}", "amount": 5, "currency": "EUR"},
                        {"payment_id": "", "amount": -1, "currency": "euro"},
                    ]
                )
            ),
        )
    env = envelope(task, args, kwargs, queue)
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["header", "header", "top", "property", "body"]))
        value = draw(json_values)
        if where == "header" and isinstance(env.get("headers"), dict):
            name = draw(st.sampled_from(HEADER_NAMES))
            if draw(st.booleans()):
                env["headers"].pop(name, None)
            elif name not in ("eta",):  # a valid future eta would wait inside Celery
                env["headers"][name] = value
        elif where == "top":
            name = draw(
                st.sampled_from(
                    ["body", "headers", "properties", "content-type", "content-encoding"]
                )
            )
            env[name] = value
        elif where == "property" and isinstance(env.get("properties"), dict):
            name = draw(st.sampled_from(["delivery_tag", "body_encoding", "delivery_info"]))
            env["properties"][name] = value
        elif where == "body":
            body = draw(
                st.one_of(
                    json_values,
                    st.just([{"a": 1}, {}, {}]),
                    st.just([["v"], ["not", "a", "dict"], {}]),
                    st.just([["v"], {}]),
                )
            )
            env["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(env).encode()


def raw_items(queue: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(min_size=1, max_size=200),
        st.text(min_size=1, max_size=200).map(lambda t: t.encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.integers(MAX_BYTES + 1, 4 * MAX_BYTES).map(
            lambda n: json.dumps(envelope("test.echo", ["x" * n], {}, queue)).encode()
        ),
        st.integers(1_000, 30_000).map(lambda n: b"[" * n + b"]" * n),  # nested too deep
        celery_items(queue),
    )


def _task_id(item: bytes) -> str:
    try:
        return str(json.loads(item)["headers"]["id"])
    except Exception:
        return ""


@pytest.fixture(scope="module")
def worker(shared_env: Environment) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        shared_env, concurrency=2, RELIABLE_BROKER__MAX_MESSAGE_BYTES=str(MAX_BYTES)
    ) as process:
        yield process


def test_every_raw_item_on_the_queue_is_dead_lettered_or_run_and_the_worker_stays_up(
    shared_env: Environment, worker: WorkerProcess, shared_sandbox: Any
) -> None:
    client = redis.Redis.from_url(shared_env.redis_url)
    queue_key = shared_env.broker_prefix + shared_env.queue
    pid, children = worker.pid, {c.pid for c in worker.children()}
    pushed: list[bytes] = []

    @settings(
        max_examples=int(os.environ.get("RELIABLE_POISON_EXAMPLES", "150")),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(item=raw_items(shared_env.queue))
    def push(item: bytes) -> None:
        client.lpush(queue_key, item)
        pushed.append(item)

    push()
    ledger = Ledger(Store(shared_env.redis_url, shared_env.prefix))

    def finals() -> int:
        return sum(1 for row in ledger.entries() if row.get("outcome") in FINAL)

    try:
        wait_until(
            lambda: finals() >= len(pushed),
            timeout=120,
            interval=0.2,
            message=f"{len(pushed)} items settled (log: {worker.log_path})",
        )
    except AssertionError as exc:
        done = {row.get("task_id") for row in ledger.entries() if row.get("outcome") in FINAL}
        unsettled = [
            item[:3000]
            for item in pushed
            if _task_id(item) and _task_id(item) not in done and len(item) < MAX_BYTES
        ]
        raise AssertionError(f"{exc}; unsettled items: {unsettled[:5]}") from None
    wait_until(lambda: client.llen(queue_key) == 0, timeout=10, message="queue drained")
    assert worker.proc is not None and worker.proc.poll() is None
    assert worker.pid == pid
    assert {c.pid for c in worker.children()} == children  # no pool child died either
    # Exactly one final record per item: nothing lost, nothing settled twice.
    assert finals() == len(pushed)
    processing = [
        k
        for k in client.scan_iter(f"{shared_env.broker_prefix}*:processing:*")
        if not k.endswith(b":alive")
    ]
    assert all(client.llen(k) == 0 for k in processing)
    assert client.hlen(shared_env.broker_prefix + "unacked") == 0
    dlq = DeadLetterQueue(Store(shared_env.redis_url, shared_env.prefix))
    entries = list(dlq.iter())
    too_large = [e for e in entries if e.reason.startswith("too_large")]
    expected_large = sum(1 for item in pushed if len(item) > MAX_BYTES)
    assert len(too_large) == expected_large
    assert all(e.failure_class == "poison" and e.raw_body for e in too_large)
    assert "Unrecoverable error" not in worker.log_text()


def deeply_nested() -> bytes:
    return b"[" * 30_000 + b"]" * 30_000


@pytest.mark.parametrize(
    "item, kind",
    [
        (b"", "empty"),
        (b"not json", "not_json"),
        (b"\xff\xfe\x00garbage", "not_utf8"),
        (b"[1, 2]", "bad_envelope"),
        (b'{"body": "x"}', "bad_envelope"),
        (b'{"properties": {}}', "bad_envelope"),
        (b'{"properties": {"delivery_tag": "t", "delivery_info": {}}}', "bad_envelope"),
        (
            b'{"properties": {"delivery_tag": "t", "body_encoding": "base64"}, "body": "!!"}',
            "bad_envelope",
        ),
        (deeply_nested(), "not_json"),
        (b"x" * (MAX_BYTES + 1), "too_large"),
    ],
    ids=[
        "empty",
        "text",
        "binary",
        "json-list",
        "no-properties",
        "no-tag",
        "no-routing",
        "bad-base64",
        "nested",
        "too-large",
    ],
)
def test_check_item_names_what_is_wrong(item: bytes, kind: str) -> None:
    with pytest.raises(Poison) as caught:
        check_item(item, MAX_BYTES)
    assert caught.value.kind == kind


def test_check_item_accepts_a_real_envelope() -> None:
    payload = check_item(json.dumps(envelope("test.echo", [1], {}, "q")).encode(), MAX_BYTES)
    assert payload["headers"]["task"] == "test.echo"
