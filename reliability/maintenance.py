"""Fleet maintenance run by exactly one worker: the parked-message mover and the reaper.

Every worker's main process runs a :class:`Maintenance` thread; a leader lease in
Redis (``SET NX PX``, renewed by its holder) lets one of them do the work, so the fleet
has one mover and one reaper, and another worker takes over within one lease TTL
when the leader dies.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence

import structlog

from reliability.deferral import Mover
from reliability.errors import BackendUnavailable
from reliability.reaper import Reaper
from reliability.scripts import compose
from reliability.store import Store

log = structlog.get_logger("reliability.maintenance")
# The loop never spins faster than this, however close the next due message.
MIN_WAIT_SECONDS = 0.005

# KEYS leader   ARGV now, identity, ttl_ms  -> 1 when the caller leads
LEAD = compose(
    body="""
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
  return 1
end
return 0
"""
)


class Maintenance(threading.Thread):
    """Leader-elected loop: move due parked messages, reap lapsed leases."""

    def __init__(
        self,
        store: Store,
        mover: Mover,
        reaper: Reaper | None,
        *,
        interval: float = 0.2,
        leader_ttl: float = 3.0,
        reap_every: float = 0.5,
        sweepers: Sequence[Callable[[], int]] = (),
    ) -> None:
        super().__init__(name="reliable-maintenance", daemon=True)
        self.store = store
        self.mover = mover
        self.reaper = reaper
        self.interval = interval
        self.leader_ttl = leader_ttl
        self.reap_every = reap_every
        self.sweepers = list(sweepers)
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.leading = False
        self._stopping = threading.Event()
        self._since_reap = 0.0

    def stop(self) -> None:
        self._stopping.set()

    def lead(self) -> bool:
        keys = self.store.keys
        leading = bool(
            self.store.run(
                LEAD, [keys.leader], ["", self.identity, int(self.leader_ttl * 1000)], "lead"
            )
        )
        if leading != self.leading:
            log.info("maintenance_leader_changed", leading=leading, identity=self.identity)
        self.leading = leading
        return leading

    def tick(self) -> float:
        """One round; returns how long to wait before the next (the next due message)."""
        if not self.lead():
            return self.leader_ttl / 3
        while self.mover.move_due() >= self.mover.batch_size:
            pass
        _pending, next_due = self.mover.outlook()
        self._since_reap += self.interval
        if self._since_reap >= self.reap_every:
            self._since_reap = 0.0
            if self.reaper is not None:
                self.reaper.revive_dead()
                self.reaper.reap()
            for sweep in self.sweepers:
                sweep()
        if next_due is None:
            return self.interval
        # Wake when the next parked message is due (a fleet-wide limit's reserved slots are
        # published on time, not in bunches per tick), at most every `interval`.
        return min(max(next_due - self.store.now(), MIN_WAIT_SECONDS), self.interval)

    def run(self) -> None:
        while not self._stopping.is_set():
            wait = 1.0
            try:
                wait = self.tick()
            except BackendUnavailable as exc:
                if self.reaper is not None:
                    self.reaper.interrupted()
                log.warning("maintenance_store_unavailable", error=str(exc))
            except Exception:
                log.exception("maintenance_tick_failed")
            self._stopping.wait(wait)
        if self.leading:
            with contextlib.suppress(BackendUnavailable):
                self.store.call(
                    "resign",
                    lambda c: (
                        c.delete(self.store.keys.leader)
                        if c.get(self.store.keys.leader) == self.identity
                        else 0
                    ),
                )
