"""The Redis state store: one client per process, the key layout, scripts by SHA.

Every read-modify-write the fleet shares is a Lua script registered here once and
called by SHA (one round trip). Redis driver errors are wrapped into
:class:`BackendUnavailable` at this one boundary, so the fail-closed decision lives in
the callers that know what to do (the task pipeline waits, the CLI reports).

Key layout (``P`` is the configured prefix, ``{tag}`` a Redis Cluster hash tag — the
task's dependency or name — so one admission's keys can share a slot):

=============================  =====================================================
``P:{tag}:idem:<key>``         hash: idempotency state, owner, fence, result
``P:{tag}:dlv:<id>:<n>:<pub>``  hash: one message delivery (redelivery count, outcome)
``P:{tag}:defer:<defer id>``   string: which published copy of a parked message runs
``P:{tag}:budget:<n>``          strings per window: retry-budget calls and retries
``P:leases``                   zset: idempotency keys by lease expiry (the reaper's view)
``P:parked`` / ``P:parked:msg``  zset by due time + hash of parked message envelopes
``P:ledger``                   stream: one outcome per delivery, capped by MAXLEN
``P:dlq`` / ``P:dlq:index``     hash of DLQ envelopes + zset by last failure time
``P:maint:leader``             string: which worker runs the mover and reaper
``P:workers`` / ``P:hb:<id>``   hash of workers that beat + one heartbeat key each (TTL)
=============================  =====================================================

The global keys (leases, parked, ledger, DLQ) are one per deployment; on Redis Cluster
they would be split per tag. The reference deployment is one primary.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from redis.commands.core import Script

from reliability.errors import BackendUnavailable
from reliability.metrics import STORE_LATENCY
from reliability.security import key_token

T = TypeVar("T")

# Errors that mean "the store is not reachable right now" (not a bug in a script).
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    OSError,
)


@contextmanager
def wrap_errors(action: str) -> Iterator[None]:
    """Turn a driver error into :class:`BackendUnavailable` naming what was attempted."""
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise BackendUnavailable(f"redis unavailable during {action}: {exc}") from exc


class Keys:
    """Names of every key the service writes, under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.leases = f"{prefix}:leases"
        self.parked = f"{prefix}:parked"
        self.parked_msgs = f"{prefix}:parked:msg"
        self.ledger = f"{prefix}:ledger"
        self.dlq = f"{prefix}:dlq"
        self.dlq_index = f"{prefix}:dlq:index"
        self.leader = f"{prefix}:maint:leader"
        self.workers = f"{prefix}:workers"

    def heartbeat(self, worker: str) -> str:
        return f"{self.prefix}:hb:{worker}"

    def idem(self, tag: str, key: str) -> str:
        return f"{self.prefix}:{{{tag}}}:idem:{key}"

    # Task ids and defer/publish ids come from message headers: a producer may put
    # anything there, so only short safe ones are kept verbatim (key_token).
    def delivery(self, tag: str, task_id: str, retries: int, pub: str) -> str:
        return f"{self.prefix}:{{{tag}}}:dlv:{key_token(task_id)}:{retries}:{key_token(pub)}"

    def defer(self, tag: str, defer_id: str) -> str:
        return f"{self.prefix}:{{{tag}}}:defer:{key_token(defer_id)}"

    def budget(self, tag: str) -> str:
        return f"{self.prefix}:{{{tag}}}:budget"


class Store:
    """A lazily created, fork-aware Redis client plus the registered scripts."""

    def __init__(
        self,
        url: str,
        prefix: str = "rel",
        *,
        socket_timeout: float = 5.0,
        client_factory: Callable[..., redis.Redis] | None = None,
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self._socket_timeout = socket_timeout
        self._factory = client_factory or redis.Redis.from_url
        self._client: redis.Redis | None = None
        self._pid = 0
        self._scripts: dict[str, Script] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        """The process's client; recreated after a fork (a pool child never shares sockets)."""
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            with self._lock:
                if self._client is None or self._pid != pid:
                    self._client = self._factory(
                        self.url,
                        decode_responses=True,
                        # All we write is UTF-8; bytes another program wrote (a hand-made
                        # DLQ entry, a tampered key) read as U+FFFD rather than failing
                        # a whole listing with UnicodeDecodeError.
                        encoding_errors="replace",
                        socket_timeout=self._socket_timeout,
                        socket_connect_timeout=self._socket_timeout,
                        health_check_interval=30,
                    )
                    self._scripts = {}
                    self._pid = pid
        return self._client

    def script(self, lua: str) -> Script:
        """The registered script for this source (EVALSHA, loaded on first NOSCRIPT)."""
        client = self.client
        found = self._scripts.get(lua)
        if found is None:
            found = self._scripts[lua] = client.register_script(lua)
        return found

    def run(self, lua: str, keys: Sequence[str], args: Sequence[Any], action: str) -> Any:
        """Run a script in one round trip; store outages become :class:`BackendUnavailable`."""
        started = time.perf_counter()
        try:
            with wrap_errors(action):
                return self.script(lua)(keys=list(keys), args=list(args))
        finally:
            STORE_LATENCY.labels(action).observe(time.perf_counter() - started)

    def call(self, action: str, fn: Callable[[redis.Redis], T]) -> T:
        """Run ``fn(client)`` with driver errors wrapped."""
        started = time.perf_counter()
        try:
            with wrap_errors(action):
                return fn(self.client)
        finally:
            STORE_LATENCY.labels(action).observe(time.perf_counter() - started)

    def now(self) -> float:
        """The store's clock (``TIME``): the one clock every process agrees on."""
        seconds, micros = self.call("TIME", lambda c: c.time())
        return seconds + micros / 1_000_000

    def ping(self) -> bool:
        try:
            return bool(self.call("PING", lambda c: c.ping()))
        except BackendUnavailable:
            return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
