"""The fleet hands back what dead processes left in their processing lists, under any prefix.

Runs :mod:`reliability.orphans` against real Redis through kombu's prefixed client, as the
transport does: kombu prefixes the key of some commands (HSET, HDEL) and not of others
(HGETALL, EXISTS, LMOVE), and every registry entry must still be found and removed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu.transport.redis import PrefixedStrictRedis

from reliability import orphans
from reliability.unacked import OWNERS
from tests.support.fleet import delete_prefix

SEP = "\x06\x16"  # kombu's separator of a queue and its priority step


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"orphans-{uuid.uuid4().hex[:10]}:"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[PrefixedStrictRedis]:
    # As kombu builds it: replies are bytes (no decode_responses).
    pool = redis.ConnectionPool.from_url(redis_url)
    client = PrefixedStrictRedis(connection_pool=pool, global_keyprefix=prefix)
    yield client
    client.close()
    pool.disconnect()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def popped(
    client: PrefixedStrictRedis,
    raw: redis.Redis,
    prefix: str,
    queue: str,
    worker: str,
    items: list[str],
    alive: bool,
) -> str:
    """What a channel leaves behind: items in its processing list, registered (and alive)."""
    full_queue = prefix + queue
    processing = orphans.processing_key(queue, worker)
    if items:
        raw.rpush(prefix + processing, *items)
    client.execute_command("HSET", orphans.REGISTRY, prefix + processing, full_queue)
    if alive:
        client.execute_command("SET", processing + ":alive", "1", "PX", 30_000)
    return prefix + processing


def test_restoring_a_dead_worker_moves_its_messages_back_and_forgets_only_its_lists(
    client: PrefixedStrictRedis, raw: redis.Redis, prefix: str
) -> None:
    dead = popped(client, raw, prefix, "q", "host:1", ["m1", "m2"], alive=False)
    live = popped(client, raw, prefix, "q", "host:2", ["m3"], alive=True)
    raw.hset(prefix + OWNERS, mapping={"tag-a": "host:1", "tag-b": "host:2"})
    restored: list[str] = []

    moved = orphans.restore(client, prefix, "host:1", OWNERS, restored.append)

    assert moved == 3  # one unacked message by tag, two from its processing list
    assert restored == ["tag-a"]
    assert raw.lrange(prefix + "q", 0, -1) == ["m1", "m2"]
    assert raw.lrange(dead, 0, -1) == []
    assert raw.lrange(live, 0, -1) == ["m3"]
    assert raw.hgetall(prefix + orphans.REGISTRY) == {live: prefix + "q"}


def test_the_sweep_returns_dead_lists_and_priority_sub_queues_and_leaves_live_lists(
    client: PrefixedStrictRedis, raw: redis.Redis, prefix: str
) -> None:
    dead = popped(client, raw, prefix, "q", "host:1", ["m1"], alive=False)
    live = popped(client, raw, prefix, "q", "host:2", ["m2"], alive=True)
    raw.rpush(f"{prefix}q{SEP}9", "p9")
    raw.rpush(f"{prefix}q{SEP}3", "p3")

    # Both registered lists drain into q: each sweeps q's three priority sub-queues.
    moved = orphans.sweep(client, prefix, SEP)

    assert moved == 3
    assert sorted(raw.lrange(prefix + "q", 0, -1)) == ["m1", "p3", "p9"]
    assert raw.lrange(dead, 0, -1) == []
    assert raw.lrange(live, 0, -1) == ["m2"]
    assert raw.hgetall(prefix + orphans.REGISTRY) == {live: prefix + "q"}
    assert orphans.sweep(client, prefix, SEP) == 0  # nothing left to hand back
