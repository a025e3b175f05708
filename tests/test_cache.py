"""The tracked cache serves hits locally and never serves a value Redis has since changed."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest
import redis

from reliability.cache import CacheStats, TrackedCache
from tests.support.fleet import wait_until
from tests.support.redis_server import RedisServer


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = "cache-" + uuid.uuid4().hex[:10] + ":"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def writer(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def cache(redis_url: str) -> Iterator[TrackedCache]:
    with TrackedCache(redis_url, socket_timeout=2.0) as cache:
        yield cache


def wait_for_invalidations(cache: TrackedCache, count: int) -> None:
    wait_until(
        lambda: cache.stats.invalidations >= count, timeout=10, message=f"{count} invalidation(s)"
    )
    assert cache.stats.invalidations == count


def data_connection_id(admin: redis.Redis, cache: TrackedCache) -> str:
    """The tracked data connection: the client whose redirect is our invalidation connection."""
    redirect = str(cache.invalidation_client_id)
    (client,) = [c for c in admin.client_list() if c.get("redir") == redirect]
    return str(client["id"])


def test_a_write_by_another_client_invalidates_the_cached_hash(
    cache: TrackedCache, writer: redis.Redis, prefix: str
) -> None:
    key = prefix + "breaker"
    writer.hset(key, mapping={"state": "closed", "failures": "0"})
    assert cache.get_hash(key) == {"state": "closed", "failures": "0"}
    assert cache.get_hash(key) == {"state": "closed", "failures": "0"}
    assert cache.stats == CacheStats(hits=1, misses=1)

    writer.hset(key, "state", "open")
    wait_for_invalidations(cache, 1)
    assert len(cache) == 0
    assert cache.get_hash(key) == {"state": "open", "failures": "0"}
    assert cache.get_hash(key) == {"state": "open", "failures": "0"}
    assert cache.stats == CacheStats(hits=2, misses=2, invalidations=1)


def test_strings_and_missing_keys_are_cached_and_invalidated_too(
    cache: TrackedCache, writer: redis.Redis, prefix: str
) -> None:
    string_key, hash_key = prefix + "s", prefix + "h"
    assert cache.get(string_key) is None
    assert cache.get_hash(hash_key) == {}
    assert cache.get(string_key) is None
    assert cache.get_hash(hash_key) == {}
    assert cache.stats == CacheStats(hits=2, misses=2)

    writer.set(string_key, "half_open")
    writer.hset(hash_key, "state", "closed")
    wait_for_invalidations(cache, 2)
    assert cache.get(string_key) == "half_open"
    assert cache.get_hash(hash_key) == {"state": "closed"}
    assert cache.stats == CacheStats(hits=2, misses=4, invalidations=2)


def test_a_returned_hash_is_a_copy_and_local_invalidate_drops_one_key(
    cache: TrackedCache, writer: redis.Redis, prefix: str
) -> None:
    writer.hset(prefix + "a", "f", "1")
    cache.get_hash(prefix + "a")["f"] = "mutated"
    assert cache.get_hash(prefix + "a") == {"f": "1"}
    cache.invalidate(prefix + "a")
    assert len(cache) == 0
    assert cache.get_hash(prefix + "a") == {"f": "1"}
    assert cache.stats == CacheStats(hits=1, misses=2, invalidations=1)


def test_the_least_recently_used_entry_is_evicted_beyond_max_entries(
    redis_url: str, prefix: str
) -> None:
    with TrackedCache(redis_url, max_entries=2) as cache:
        for name in ("a", "b", "a", "c"):
            cache.get_hash(prefix + name)
        assert len(cache) == 2
        cache.get_hash(prefix + "a")  # kept: used more recently than b
        cache.get_hash(prefix + "b")  # evicted
        assert cache.stats == CacheStats(hits=2, misses=4)


def test_an_invalidation_racing_a_read_never_leaves_the_stale_value_cached(
    redis_url: str, writer: redis.Redis, prefix: str
) -> None:
    key = prefix + "breaker"
    writer.hset(key, "state", "closed")
    raced: list[str] = []

    def write_between_read_and_insert(fetched_key: str) -> None:
        if not raced:  # only the first read: its reply ("closed") is already stale afterwards
            raced.append(fetched_key)
            writer.hset(key, "state", "open")
            wait_for_invalidations(cache, 1)

    with TrackedCache(redis_url, on_fetched=write_between_read_and_insert) as cache:
        assert cache.get_hash(key) == {"state": "closed"}  # the read itself was correct
        assert len(cache) == 0  # ...but it was not cached after its invalidation
        assert cache.get_hash(key) == {"state": "open"}
        assert cache.get_hash(key) == {"state": "open"}
        assert raced == [key]
        assert cache.stats == CacheStats(hits=1, misses=2, invalidations=1)


def test_killing_the_invalidation_connection_flushes_and_tracking_is_reestablished(
    cache: TrackedCache, writer: redis.Redis, prefix: str
) -> None:
    key = prefix + "breaker"
    writer.hset(key, "state", "closed")
    cache.get_hash(key)
    first_id = cache.invalidation_client_id
    assert first_id is not None and len(cache) == 1

    writer.client_kill_filter(_id=str(first_id))
    wait_until(
        lambda: cache.invalidation_client_id not in (None, first_id),
        timeout=10,
        message="a new invalidation connection",
    )
    assert len(cache) == 0
    assert cache.stats.flushes == 1

    assert cache.get_hash(key) == {"state": "closed"}  # re-points tracking at the new id
    assert data_connection_id(writer, cache)  # the data connection reports to the new id
    writer.hset(key, "state", "open")
    wait_for_invalidations(cache, 1)
    assert cache.get_hash(key) == {"state": "open"}
    assert cache.stats == CacheStats(hits=0, misses=3, invalidations=1, flushes=1)


def test_killing_the_data_connection_flushes_at_once_and_the_next_read_is_tracked_again(
    cache: TrackedCache, writer: redis.Redis, prefix: str
) -> None:
    key = prefix + "breaker"
    writer.hset(key, "state", "closed")
    cache.get_hash(key)
    writer.client_kill_filter(_id=data_connection_id(writer, cache))
    # Redis forgot what the dead connection tracked: no invalidation would ever come.
    wait_until(lambda: cache.stats.flushes == 1, timeout=10, message="flush on data loss")
    assert len(cache) == 0

    writer.hset(key, "state", "half_open")
    assert cache.get_hash(key) == {"state": "half_open"}  # reconnects and re-enables tracking
    assert data_connection_id(writer, cache)
    writer.hset(key, "state", "open")
    wait_for_invalidations(cache, 1)
    assert cache.get_hash(key) == {"state": "open"}
    assert cache.stats == CacheStats(hits=0, misses=3, invalidations=1, flushes=1)


def test_a_fork_child_opens_its_own_connections_and_the_parent_keeps_working(
    cache: TrackedCache, redis_url: str, writer: redis.Redis, prefix: str
) -> None:
    key = prefix + "breaker"
    writer.hset(key, "state", "closed")
    cache.get_hash(key)
    parent_id = cache.invalidation_client_id
    pid = os.fork()
    if pid == 0:  # child: never touch the parent's sockets; report through the exit code
        code = 1
        try:
            assert len(cache) == 0 and cache.stats == CacheStats()
            assert cache.get_hash(key) == {"state": "closed"}
            assert cache.invalidation_client_id not in (None, parent_id)
            own_writer = redis.Redis.from_url(redis_url, decode_responses=True)
            own_writer.hset(key, "state", "open")
            wait_for_invalidations(cache, 1)
            assert cache.get_hash(key) == {"state": "open"}
            cache.close()
            code = 0
        except BaseException as exc:
            sys.stderr.write(f"fork child failed: {exc!r}\n")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for_invalidations(cache, 1)  # the child's write reached the parent's cache too
    assert cache.invalidation_client_id == parent_id
    assert cache.get_hash(key) == {"state": "open"}


@pytest.fixture(scope="module")
def redis62(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis62"))).start()
    yield server
    server.stop()


def test_on_redis_6_2_writes_and_flushdb_invalidate_and_reads_bypass_while_untracked(
    redis62: RedisServer,
) -> None:
    admin = redis.Redis.from_url(redis62.url, decode_responses=True)
    assert admin.info("server")["redis_version"].startswith("6.2.")
    with TrackedCache(redis62.url, socket_timeout=2.0) as cache:
        admin.hset("breaker", "state", "closed")
        assert cache.get_hash("breaker") == cache.get_hash("breaker") == {"state": "closed"}
        admin.hset("breaker", "state", "open")
        wait_for_invalidations(cache, 1)
        assert cache.get_hash("breaker") == {"state": "open"}
        admin.flushdb()  # a null invalidation message: drop everything
        wait_until(lambda: cache.stats.flushes == 1, timeout=10, message="flush message")
        assert len(cache) == 0 and cache.get_hash("breaker") == {}

        # Keep the invalidation connection from coming back: reads go to Redis, uncached.
        admin.config_set("maxclients", 2)  # admin + data connection
        old_id = cache.invalidation_client_id
        admin.client_kill_filter(_id=str(old_id))
        wait_until(lambda: cache.invalidation_client_id is None, timeout=10, message="untracked")
        admin.hset("breaker", "state", "half_open")
        assert cache.get_hash("breaker") == cache.get_hash("breaker") == {"state": "half_open"}
        assert len(cache) == 0
        admin.config_set("maxclients", 10_000)
        wait_until(
            lambda: cache.invalidation_client_id is not None,
            timeout=10,
            message="tracking re-established",
        )
        assert cache.get_hash("breaker") == cache.get_hash("breaker") == {"state": "half_open"}
        admin.hset("breaker", "state", "closed")
        wait_for_invalidations(cache, 2)
        assert cache.get_hash("breaker") == {"state": "closed"}
        assert cache.stats == CacheStats(hits=2, misses=7, invalidations=2, flushes=2, bypasses=2)
