"""The reaper: revives a task whose whole worker died, as soon as its lease lapses.

When a pool child dies its parent releases the lease at once (see ``request.py``). When
the whole worker dies nobody does: the lease stops being renewed and lapses within one
TTL. The reaper finds lapsed leases still marked running and restores the *original*
unacked message to its queue through kombu (the same operation kombu's visibility
sweep performs an hour later by default), so the task runs again within about one
lease TTL. A holder that was only paused finds its fence superseded when it wakes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from reliability import metrics, scripts
from reliability.store import Store

log = structlog.get_logger("reliability.reaper")

Restore = Callable[[str], bool]


class Reaper:
    """Finds lapsed leases and hands their delivery tags to ``restore``."""

    def __init__(self, store: Store, restore: Restore, batch_size: int = 100) -> None:
        self.store = store
        self.restore = restore
        self.batch_size = batch_size

    def reap(self, now: float | None = None) -> int:
        flat = self.store.run(
            scripts.REAP_LEASES,
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
