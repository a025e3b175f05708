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

from reliability import metrics
from reliability.store import Store

log = structlog.get_logger("reliability.lease")

# Renew when this share of the lease has passed.
RENEW_FRACTION = 1 / 3


@dataclass
class Lease:
    """One lease a running delivery holds under one guard, and the script renewing it.

    Guards add theirs in :meth:`Guard.hold <reliability.guard.Guard.hold>`; the keeper
    knows nothing of what they mean. A script returns a truthy reply when it kept the
    lease; ``lost`` names the warning logged when one renewed before is refused now.
    """

    script: str  # the Lua source (scripts.compose)
    keys: list[str]
    args: list[Any]
    seconds: float  # the lease's TTL: renewed when a third of it has passed
    lost: str | None = None
    held: bool = False  # renewed at least once


@dataclass
class Holding:
    """What one running delivery holds, and when to renew it next."""

    owner: str
    pid: int | None  # the process running the body (None: unknown yet, not renewed)
    leases: list[Lease] = field(default_factory=list)
    renew_at: float = 0.0

    def period(self) -> float:
        """Seconds between renewals: a third of the shortest lease held."""
        return min((lease.seconds for lease in self.leases), default=60.0) * RENEW_FRACTION

    @property
    def empty(self) -> bool:
        return not self.leases


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
            for lease in holding.leases:
                self.store.script(lease.script)(keys=lease.keys, args=lease.args, client=pipe)
            queued.append(holding)
        return queued

    def settle(self, queued: list[Holding], replies: list[Any]) -> None:
        """Read the renewal replies (in :meth:`due`'s order): log a lease found lost."""
        leases = [lease for holding in queued for lease in holding.leases]
        for lease, reply in zip(leases, replies, strict=True):
            if reply:
                lease.held = True
                metrics.LEASE_RENEWALS.inc()
            elif lease.held:
                # Renewed before, refused now: the lease lapsed or was taken over.
                lease.held = False
                metrics.LEASE_LAPSES.inc()
                if lease.lost:
                    log.warning(lease.lost, key=lease.keys[0])
