"""The worker's pulse: proves its main process is alive and keeps its bodies' leases.

Every worker's main process runs one :class:`Heartbeat` thread. About every second it
sets ``P:hb:<identity>`` with a TTL of a few seconds and, in the same round trip, renews
the leases that are due (:class:`~reliability.lease.LeaseKeeper`). When a whole worker
dies (SIGKILL, a lost host) its heartbeat key expires within the TTL; the maintenance
leader then restores its unacked messages and frees its idempotency leases
(:meth:`~reliability.reaper.Reaper.revive_dead`) — seconds after the death, not a lease
TTL. ``P:workers`` lists the workers that ever beat, so the leader knows whom to check.

A worker's identity is ``<hostname>:<main pid>``: the owner of its transport processing
lists, the key of its unacked messages (``reliability.transport``), and the prefix of
its lease owner tokens.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import structlog

from reliability.errors import BackendUnavailable
from reliability.lease import LeaseKeeper
from reliability.store import Store

if TYPE_CHECKING:
    import redis

log = structlog.get_logger("reliability.heartbeat")

# A beat about every second; a worker silent for this many seconds counts as dead.
DEFAULT_INTERVAL_SECONDS = 1.0
DEFAULT_TTL_SECONDS = 4.0
# The heartbeat thread looks for newly started deliveries this often.
REFRESH_SECONDS = 0.1


# One random part per process (by pid: a forked child gets its own).
_NONCES: dict[int, str] = {}


def identity() -> str:
    """This worker's identity: ``<hostname>:<pid>:<nonce>`` of the process calling it (the
    main process, where the consumer and the heartbeat run).

    The nonce makes it unique where hostname and pid are not: containers sharing the
    host's network (and so its hostname) each run their worker as pid 1; two of them
    must never share a heartbeat, unacked messages or leases (revival would take one
    for the other)."""
    pid = os.getpid()
    nonce = _NONCES.get(pid)
    if nonce is None:
        nonce = _NONCES[pid] = uuid.uuid4().hex[:8]
    return f"{socket.gethostname()}:{pid}:{nonce}"


class Heartbeat(threading.Thread):
    """Beats and renews due leases until stopped; deregisters the worker on a clean stop."""

    def __init__(
        self,
        store: Store,
        keeper: LeaseKeeper | None = None,
        *,
        name: str = "",
        interval: float = DEFAULT_INTERVAL_SECONDS,
        ttl: float = DEFAULT_TTL_SECONDS,
        me: str | None = None,
    ) -> None:
        super().__init__(name="reliable-heartbeat", daemon=True)
        self.store = store
        self.keeper = keeper
        self.interval = interval
        self.ttl = ttl
        self.identity = me or identity()
        self.info = json.dumps(
            {"node": name, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        )
        self._stopping = threading.Event()
        self.beats = 0

    def beat(self) -> None:
        """One beat, plus the renewals that are due, in one round trip."""
        keys = self.store.keys

        def send(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(keys.heartbeat(self.identity), self.info, px=int(self.ttl * 1000))
            pipe.hset(keys.workers, self.identity, self.info)
            queued = self.keeper.due(pipe) if self.keeper is not None else []
            replies = pipe.execute()
            if self.keeper is not None:
                self.keeper.settle(queued, replies[2:])

        self.store.call("heartbeat", send)
        self.beats += 1

    def run(self) -> None:
        next_beat = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            due = None
            if self.keeper is not None:
                self.keeper.refresh(now)
                due = self.keeper.next_due()
            if now >= next_beat or (due is not None and due <= now):
                try:
                    self.beat()
                    next_beat = now + self.interval
                except BackendUnavailable as exc:
                    log.warning("heartbeat_store_unavailable", error=str(exc))
                    next_beat = now + min(self.interval, 0.5)
                except Exception:
                    log.exception("heartbeat_failed")
                    next_beat = now + self.interval
            wake = next_beat if due is None else min(next_beat, due)
            # Look for newly started deliveries at least this often (a short lease's first
            # renewal is due a third of its TTL after it started).
            self._stopping.wait(min(max(wake - time.monotonic(), 0.005), REFRESH_SECONDS))

    def stop(self, deregister: bool = True) -> None:
        """Stop beating; a clean shutdown also removes the worker from the registry (its
        unacked messages are restored by kombu as its connection closes)."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=5)
        if deregister:
            try:
                self.store.call("heartbeat stop", self._deregister)
            except BackendUnavailable as exc:
                log.warning("heartbeat_deregister_failed", error=str(exc))

    def _deregister(self, client: redis.Redis) -> None:
        keys = self.store.keys
        pipe = client.pipeline(transaction=False)
        pipe.delete(keys.heartbeat(self.identity))
        pipe.hdel(keys.workers, self.identity)
        pipe.execute()


def dead_workers(store: Store) -> list[str]:
    """Registered workers whose heartbeat key has expired."""
    keys = store.keys

    def read(client: Any) -> list[str]:
        registered = list(client.hkeys(keys.workers))
        if not registered:
            return []
        pipe = client.pipeline(transaction=False)
        for worker in registered:
            pipe.exists(keys.heartbeat(worker))
        alive = pipe.execute()
        return [w for w, up in zip(registered, alive, strict=True) if not up]

    return store.call("dead workers", read)
