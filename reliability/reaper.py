"""The reaper: revives the tasks of a worker that died, within seconds.

When a pool child dies its parent releases the lease at once (see ``request.py``). When
the whole worker dies nobody does, so the maintenance leader does it, two ways:

* :meth:`Reaper.revive_dead` — the worker's heartbeat (``heartbeat.py``) expired: its
  idempotency leases are released (fencing unchanged: the next holder takes the next
  fence) and its unacked messages and processing lists go back to the front of their
  queues. In-flight tasks run again a few seconds after the death. A worker is only
  declared dead by a process that has reached the store, uninterrupted, for longer than
  a heartbeat TTL (after a Redis outage every heartbeat looks old for a moment).
* :meth:`Reaper.reap` — the fallback for leases whose holder is unknown: a lease that
  lapsed (not renewed for a TTL) while still marked running has its *original* unacked
  message restored through kombu (what kombu's visibility sweep does an hour later).

A holder that was only paused finds its fence superseded when it wakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from reliability import metrics, scripts
from reliability.heartbeat import DEFAULT_INTERVAL_SECONDS, DEFAULT_TTL_SECONDS, dead_workers
from reliability.store import Store

log = structlog.get_logger("reliability.reaper")

Restore = Callable[[str], bool]
# Hands a dead worker's messages back to their queues; returns how many.
RestoreOwned = Callable[[str], int]

# KEYS leases   ARGV now, limit
# Lapsed leases still marked running: removed from the index and returned as
# (key, delivery tag) pairs for the reaper to restore.
REAP_LEASES = scripts.compose(
    body="""
local out = {}
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, key in ipairs(keys) do
  local h = redis.call('HMGET', key, 'state', 'until', 'dtag')
  redis.call('ZREM', KEYS[1], key)
  if h[1] == 'running' and tonumber(h[2] or '0') <= now then
    out[#out + 1] = key
    out[#out + 1] = h[3] or ''
  end
end
return out
"""
)

# KEYS leases   ARGV now, owner prefix ("<worker identity>:")
# Release every running idempotency lease whose owner token starts with the prefix.
FREE_LEASES = scripts.compose(
    "idempotency",
    body="""
local n = 0
local prefix = ARGV[2]
for _, key in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local owner = redis.call('HGET', key, 'owner')
  if owner and string.sub(owner, 1, #prefix) == prefix then
    n = n + idem_release(key, KEYS[1], owner, '')
  end
end
return n
""",
)


class Reaper:
    """Revives the work of dead workers (heartbeat) and of lapsed leases (fallback)."""

    def __init__(
        self,
        store: Store,
        restore: Restore,
        batch_size: int = 100,
        *,
        restore_owned: RestoreOwned | None = None,
        heartbeat_ttl: float = DEFAULT_TTL_SECONDS,
        heartbeat_interval: float = DEFAULT_INTERVAL_SECONDS,
    ) -> None:
        self.store = store
        self.restore = restore
        self.batch_size = batch_size
        self.restore_owned = restore_owned
        # Watch the store this long, uninterrupted, before declaring anyone dead.
        self.grace = heartbeat_ttl + heartbeat_interval
        self._watching_since: float | None = time.monotonic()

    def interrupted(self) -> None:
        """The store was unreachable: every heartbeat may have expired meanwhile, so the
        grace period starts again (live workers beat again within one interval)."""
        self._watching_since = None

    def revive_dead(self) -> list[str]:
        """Revive the work of every worker whose heartbeat expired; returns them."""
        now = time.monotonic()
        if self._watching_since is None:
            self._watching_since = now
        if now - self._watching_since < self.grace:
            return []
        revived = []
        for worker in dead_workers(self.store):
            freed = int(
                self.store.run(
                    FREE_LEASES,
                    [self.store.keys.leases],
                    ["", f"{worker}:"],
                    "free dead worker's leases",
                )
            )
            moved = self.restore_owned(worker) if self.restore_owned is not None else 0
            self._forget(worker)
            metrics.WORKERS_REVIVED.inc()
            log.warning(
                "worker_dead_revived", worker=worker, leases_released=freed, messages_restored=moved
            )
            revived.append(worker)
        return revived

    def _forget(self, worker: str) -> None:
        """Remove a revived worker from the registry (its heartbeat key expired already)."""
        self.store.call("forget worker", lambda c: c.hdel(self.store.keys.workers, worker))

    def reap(self, now: float | None = None) -> int:
        flat = self.store.run(
            REAP_LEASES,
            [self.store.keys.leases],
            ["" if now is None else now, self.batch_size],
            "reap leases",
        )
        restored = 0
        for index in range(0, len(flat), 2):
            key, tag = flat[index], flat[index + 1]
            ok = bool(tag) and self.restore(tag)
            restored += int(ok)
            log.warning("lease_lapsed", key=key, delivery_tag=tag, message_restored=ok)
        if restored:
            metrics.LEASES_REAPED.inc(restored)
        return restored


def kombu_restorer(app: Any) -> Restore:
    """Restore an unacked message by delivery tag on kombu's Redis transport.

    Other transports (RabbitMQ) requeue a dead consumer's messages themselves, so the
    restorer reports False there and the lapsed lease simply frees the key.
    """

    def restore(tag: str) -> bool:
        with app.pool.acquire(block=True) as conn:  # a pooled connection, not a new one
            channel = conn.default_channel
            qos = getattr(channel, "qos", None)
            if qos is None or not hasattr(qos, "restore_by_tag"):
                return False
            with channel.conn_or_acquire() as client:
                # HGET, not HEXISTS: kombu's prefixed client (global_keyprefix) prefixes
                # only the commands it uses itself, so HEXISTS would read the wrong key.
                if client.hget(qos.unacked_key, tag) is None:
                    return False
            qos.restore_by_tag(tag, leftmost=False)
            return True

    return restore
