"""A local cache of small Redis values, kept coherent by server-assisted client-side caching.

For reads *outside* tasks (a breaker's state read by web code): a hit costs no round trip.
redis-py's own client cache needs Redis 7.4+, so this uses what Redis 6.2 already offers:
RESP2 ``CLIENT TRACKING on REDIRECT <id>``. Two connections per process:

- the *data* connection reads (``HGETALL`` / ``GET``) with tracking on, redirected to
- the *invalidation* connection, subscribed to ``__redis__:invalidate`` and read by a daemon
  thread (:mod:`reliability.invalidation`); each message drops the keys it names, a null
  message (FLUSHDB) drops everything.

Never serve possibly stale data: when the invalidation connection drops, the cache is flushed at
once and reads go to Redis uncached until a new invalidation connection is subscribed (the data
connection is then re-pointed at its new id before its next read). When the data connection
drops, Redis forgets what it tracked, so the cache is flushed too. A miss registers a per-key
token *before* its read; an invalidation or flush removes the token, and the reply is cached only
if the token survived, so an invalidation racing the read never leaves a stale value behind.
Fork-aware: a child forgets the parent's sockets and thread, and starts its own on first use.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis
import structlog

from reliability.errors import BackendUnavailable, ConfigurationError, ReliabilityError
from reliability.invalidation import HEALTH_CHECK_SECONDS as HEALTH_CHECK_SECONDS
from reliability.invalidation import INVALIDATION_CHANNEL as INVALIDATION_CHANNEL
from reliability.invalidation import POLL_SECONDS as POLL_SECONDS
from reliability.invalidation import RECONNECT_FIRST_SECONDS as RECONNECT_FIRST_SECONDS
from reliability.invalidation import RECONNECT_MAX_SECONDS as RECONNECT_MAX_SECONDS
from reliability.invalidation import InvalidationListener

log = structlog.get_logger("reliability.cache")

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass
class CacheStats:
    """Counters since creation or fork; ``misses`` include ``bypasses`` (reads while untracked)."""

    hits: int = 0
    misses: int = 0
    invalidations: int = 0  # keys dropped by a server message or invalidate()
    flushes: int = 0  # whole-cache drops: null message, lost connection, clear()
    bypasses: int = 0


class TrackedCache:
    """Thread-safe cache of Redis hashes (``get_hash``) and strings (``get``), LRU-bounded.

    ``on_fetched(key)`` is an injection point for tests: it runs after a miss's reply arrived
    and before the reply is cached. Redis errors on the data connection (after one reconnect
    attempt) raise :class:`BackendUnavailable`.
    """

    def __init__(
        self,
        url: str,
        *,
        max_entries: int = 10_000,
        socket_timeout: float = 5.0,
        on_fetched: Callable[[str], None] | None = None,
    ) -> None:
        if max_entries < 1 or socket_timeout <= 0:
            raise ConfigurationError("max_entries must be >= 1 and socket_timeout > 0")
        self._pool = redis.ConnectionPool.from_url(
            url,
            decode_responses=True,
            protocol=2,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
        )
        self._max_entries = max_entries
        self._socket_timeout = socket_timeout
        self._on_fetched = on_fetched
        self._closed = False
        self._forget_parent()
        _LIVE.add(self)

    def _forget_parent(self) -> None:
        """(Re)initialise per-process state; in a fork child, inherited sockets are dropped."""
        self._state = threading.Lock()  # guards entries, pending, stats, _inv_id
        self._io = threading.Lock()  # serialises the data connection and guards _redirect
        self._entries: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self._pending: dict[str, object] = {}
        self._stats = CacheStats()
        self._data: Any = None
        self._redirect: int | None = None  # invalidation id the data connection reports to
        self._inv_id: int | None = None  # set only while subscribed
        self._listener = InvalidationListener(self._pool, self, socket_timeout=self._socket_timeout)

    # -- public API ---------------------------------------------------------------------------

    def get_hash(self, key: str) -> dict[str, str]:
        """All fields of hash ``key`` (``{}`` when missing); a copy, safe to mutate."""
        return dict(self._read("HGETALL", key))

    def get(self, key: str) -> str | None:
        """String ``key``, or ``None`` when missing."""
        value: str | None = self._read("GET", key)
        return value

    def invalidate(self, key: str) -> None:
        """Drop ``key`` locally (e.g. after this process wrote it through another client)."""
        with self._state:
            self._drop_locked([key])

    def clear(self) -> None:
        """Drop every cached value."""
        with self._state:
            self._flush_locked()

    @property
    def stats(self) -> CacheStats:
        with self._state:
            return replace(self._stats)

    @property
    def invalidation_client_id(self) -> int | None:
        """CLIENT ID of the subscribed invalidation connection; ``None`` while disconnected."""
        return self._inv_id

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Stop the listener, close both connections and empty the cache; idempotent."""
        self._closed = True
        self._listener.stop()
        with self._io:
            if self._data is not None:
                self._data.disconnect()
            self._data, self._redirect = None, None
        with self._state:
            self._entries.clear()
            self._pending.clear()

    def __enter__(self) -> TrackedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, command: str, key: str) -> Any:
        self._ensure_started()
        token: object | None = None
        with self._state:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == command:
                self._entries.move_to_end(key)
                self._stats.hits += 1
                return entry[1]
            self._stats.misses += 1
            if self._inv_id is None:
                self._stats.bypasses += 1
            else:
                token = self._pending[key] = object()
        try:
            value = self._fetch(command, key, tracked=token is not None)
        except BaseException:
            with self._state:
                if self._pending.get(key) is token:
                    del self._pending[key]
            raise
        if token is not None:
            if self._on_fetched is not None:
                self._on_fetched(key)
            with self._state:
                if self._pending.get(key) is token:  # no invalidation or flush since the read
                    del self._pending[key]
                    self._entries[key] = (command, value)
                    if len(self._entries) > self._max_entries:
                        self._entries.popitem(last=False)
        return value

    def _fetch(self, command: str, key: str, *, tracked: bool) -> Any:
        with self._io:
            for attempt in (1, 2):
                if self._data is None:
                    self._data = self._pool.make_connection()
                    self._data.redis_connect_func = self._on_data_connect
                conn = self._data
                try:
                    if tracked:
                        self._point_tracking(conn)
                    conn.send_command(command, key)
                    reply = conn.read_response()
                    if command == "HGETALL":  # raw RESP2 reply: [field, value, field, value...]
                        return dict(zip(reply[::2], reply[1::2], strict=True))
                    return reply
                except _CONNECTION_ERRORS as exc:
                    conn.disconnect()
                    self._data_lost()
                    if attempt == 2:
                        raise BackendUnavailable(f"cache read of {key!r} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _point_tracking(self, conn: Any) -> None:
        """Make the data connection report to the current invalidation connection (io held)."""
        inv = self._inv_id
        if inv is None or self._redirect == inv:
            return  # None: the listener already flushed, so this read will not be cached
        try:
            conn.send_command("CLIENT", "TRACKING", "on", "REDIRECT", inv)
            conn.read_response()
        except redis.ResponseError:  # that connection died just now; the listener will flush
            self._redirect = None
            self.clear()
            return
        self._redirect = inv

    def _on_data_connect(self, conn: Any) -> None:
        """A new data socket starts untracked; whatever the old one tracked is forgotten."""
        conn.on_connect()
        self._data_lost()

    def _data_lost(self) -> None:
        if self._redirect is not None:
            self._redirect = None
            with self._state:
                self._flush_locked()
            log.warning("cache_data_connection_lost")

    def _ensure_started(self) -> None:
        if self._closed:
            raise ReliabilityError("TrackedCache is closed")
        self._listener.ensure_running()

    # -- what the invalidation listener reports (reliability.invalidation) ---------------------

    def on_subscribed(self, client_id: int) -> None:
        with self._state:
            self._inv_id = client_id  # from now on misses are cached

    def on_unsubscribed(self) -> None:
        with self._state:
            if self._inv_id is not None:
                self._inv_id = None
                self._flush_locked()

    def on_invalidate(self, keys: list[str] | None) -> None:
        with self._state:
            if keys is None:
                self._flush_locked()
            else:
                self._drop_locked(keys)

    def idle_data_connection(self) -> Any:
        return self._data

    def on_data_readable(self, data: Any) -> None:
        """The data socket is readable: a reply a reader is about to take, or EOF."""
        with self._io:  # waits for an in-flight read to finish
            if self._data is not data or data._sock is None:
                return
            try:
                if not data.can_read(0):
                    return
            except _CONNECTION_ERRORS:
                pass
            data.disconnect()  # closed by the server, or bytes nobody asked for
            self._data_lost()

    def _drop_locked(self, keys: list[str]) -> None:
        for key in keys:
            self._entries.pop(key, None)
            self._pending.pop(key, None)
            self._stats.invalidations += 1

    def _flush_locked(self) -> None:
        self._entries.clear()
        self._pending.clear()
        self._stats.flushes += 1


_LIVE: weakref.WeakSet[TrackedCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_LIVE):
        cache._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)
