"""Keeps the leases of running bodies alive — from the worker's main process.

A delivery holds leases while its body runs: its idempotency lease, a breaker's
half-open trial slot, concurrency places. They are renewed when a third of their TTL
has passed, so a body that runs for an hour keeps them while a crashed holder's lapse
within one TTL. Renewal happens in the worker's main process, never in the pool child
running the body: a body that holds the GIL (a long C call, a huge regex) would starve a
renewer beside it and lose its lease while alive — and a second copy would run. The
main process renews a delivery's leases only while the child running it is alive and
not stopped (SIGSTOP, a debugger): a lease lapses only when its holder is really gone
or paused, which is what fencing then covers.

The keeper knows nothing of Celery: the worker gives it the deliveries running now
(:class:`Holding` per delivery, built lazily) and calls :meth:`LeaseKeeper.due` from
its heartbeat thread, which sends the renewals in the same round trip as the beat.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from reliability import scripts
from reliability.idempotency import RENEW
from reliability.store import Store

log = structlog.get_logger("reliability.lease")

# Renew when this share of the lease has passed.
RENEW_FRACTION = 1 / 3

# KEYS trials   ARGV now, owner, seconds: a running half-open trial keeps its slot.
RENEW_TRIAL = scripts.compose(
    body="""
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
return 0
"""
)
# KEYS places   ARGV now, owner, seconds: the concurrency places a holder took
# (owner, owner#2, ...: see ratelimit.lua rl_commit) stay taken while it runs.
RENEW_PLACES = scripts.compose(
    body="""
local n = 0
local member = ARGV[2]
while redis.call('ZSCORE', KEYS[1], member) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), member)
  n = n + 1
  member = ARGV[2] .. '#' .. (n + 1)
end
if n > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[3]) + 1) * 1000)) end
return n
"""
)


@dataclass
class Holding:
    """What one running delivery holds, and when to renew it next."""

    owner: str
    pid: int | None  # the process running the body (None: unknown yet, not renewed)
    idempotency_key: str | None = None
    lease_seconds: float = 60.0
    trial_key: str | None = None  # a breaker's trial zset, if the task has a breaker
    trial_seconds: float = 60.0
    places: list[tuple[str, float]] = field(default_factory=list)  # (zset, lease seconds)
    renew_at: float = 0.0
    held: bool = False  # the idempotency lease was renewed at least once

    def period(self) -> float:
        """Seconds between renewals: a third of the shortest lease held."""
        seconds = [self.lease_seconds] if self.idempotency_key else []
        if self.trial_key:
            seconds.append(self.trial_seconds)
        seconds.extend(s for _, s in self.places)
        return min(seconds, default=60.0) * RENEW_FRACTION

    @property
    def empty(self) -> bool:
        return not (self.idempotency_key or self.trial_key or self.places)


def process_running(pid: int | None) -> bool:
    """True while ``pid`` is alive and not stopped (``T``) or a zombie (``Z``)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces).
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state not in (b"T", b"t", b"Z", b"X")


@dataclass
class Running:
    """One delivery running now, as the worker sees it."""

    delivery: str  # a unique id (the lease owner token)
    pid: int | None  # the process running its body (None until one took it)
    started: float | None  # when that process took it (monotonic), if known
    holding: Callable[[], Holding | None]  # builds what it holds (called once)


Source = Callable[[], Iterable[Running]]


class LeaseKeeper:
    """Tracks the running deliveries' holdings and queues their renewals when due.

    ``running`` yields a :class:`Running` for every delivery running now; its ``holding``
    is built once per delivery, on the keeper's thread, the first time the delivery is
    seen (so building it — binding arguments, deriving the key — never costs the
    consumer thread anything). The first renewal is due a third of a lease after the
    delivery *started*, however late the keeper first saw it.
    """

    def __init__(
        self, store: Store, running: Source, alive: Callable[[int | None], bool] = process_running
    ) -> None:
        self.store = store
        self.running = running
        self.alive = alive
        self._holdings: dict[str, Holding | None] = {}

    def refresh(self, now: float | None = None) -> None:
        """Catch up with the deliveries running now (cheap: no I/O)."""
        now = time.monotonic() if now is None else now
        seen: dict[str, Holding | None] = {}
        for running in self.running():
            if running.delivery in self._holdings:
                known = self._holdings[running.delivery]
                if known is not None:
                    known.pid = running.pid
                seen[running.delivery] = known
                continue
            try:
                holding = running.holding()
            except Exception:
                log.exception("lease_holding_unknown", delivery=running.delivery)
                holding = None
            if holding is None or holding.empty:
                seen[running.delivery] = None
                continue
            holding.pid = running.pid
            started = now if running.started is None else min(running.started, now)
            holding.renew_at = started + holding.period()
            seen[running.delivery] = holding
        self._holdings = seen

    def next_due(self) -> float | None:
        """Monotonic time of the next renewal, if any delivery holds anything."""
        times = [h.renew_at for h in self._holdings.values() if h is not None]
        return min(times, default=None)

    def due(self, pipe: Any, now: float | None = None) -> list[Holding]:
        """Queue the due renewals on ``pipe`` (a redis-py pipeline); returns their holdings
        in order, to be matched with the replies by :meth:`settle`."""
        now = time.monotonic() if now is None else now
        queued: list[Holding] = []
        for holding in self._holdings.values():
            if holding is None or holding.renew_at > now:
                continue
            holding.renew_at = now + holding.period()
            if not self.alive(holding.pid):
                continue  # gone or paused: its leases must lapse
            if holding.idempotency_key:
                self.store.script(RENEW)(
                    keys=[holding.idempotency_key, self.store.keys.leases],
                    args=["", holding.owner, "", holding.lease_seconds],
                    client=pipe,
                )
            if holding.trial_key:
                self.store.script(RENEW_TRIAL)(
                    keys=[holding.trial_key],
                    args=["", holding.owner, holding.trial_seconds],
                    client=pipe,
                )
            for key, seconds in holding.places:
                self.store.script(RENEW_PLACES)(
                    keys=[key], args=["", holding.owner, seconds], client=pipe
                )
            queued.append(holding)
        return queued

    def settle(self, queued: list[Holding], replies: list[Any]) -> None:
        """Read the renewal replies (in :meth:`due`'s order): log a lease found lost."""
        index = 0
        for holding in queued:
            if holding.idempotency_key:
                kept = bool(replies[index])
                if kept:
                    holding.held = True
                elif holding.held:
                    # Renewed before, refused now: the lease lapsed or was taken over.
                    holding.held = False
                    log.warning("idempotency_lease_lost", key=holding.idempotency_key)
                index += 1
            index += (1 if holding.trial_key else 0) + len(holding.places)
