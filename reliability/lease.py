"""Keeps the leases of running bodies alive: idempotency leases and breaker trial slots.

One daemon thread per process renews every held lease when a third of its TTL has
passed, so a body that runs for an hour keeps its key while a crashed holder's lease
lapses within one TTL. A no-op task finishes long before its first renewal and never
costs a round trip here.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import structlog

from reliability import scripts
from reliability.errors import BackendUnavailable
from reliability.store import Store

log = structlog.get_logger("reliability.lease")

# Renew when this share of the lease has passed.
RENEW_FRACTION = 1 / 3


@dataclass
class HeldLease:
    key: str
    owner: str
    fence: int
    lease_seconds: float
    renew_at: float = 0.0
    lost: bool = field(default=False)
    # What renews it: the idempotency lease by default (KEYS key, leases index).
    script: str = scripts.RENEW
    keys: list[str] = field(default_factory=list)
    kind: str = "idempotency_lease"


class LeaseKeeper:
    """Renews held leases from a background thread (created lazily, once per process)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: dict[int, HeldLease] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._wake_at = 0.0

    def hold(self, key: str, owner: str, fence: int, lease_seconds: float, *,
             script: str = scripts.RENEW, keys: list[str] | None = None,
             kind: str = "idempotency_lease") -> HeldLease:
        """Renew this lease while the body runs. ``script``/``keys`` renew another kind of
        lease (a breaker trial slot); the script takes ARGV now, owner, fence, seconds."""
        lease = HeldLease(key, owner, fence, lease_seconds, script=script,
                          keys=keys if keys is not None else [key, self.store.keys.leases],
                          kind=kind)
        lease.renew_at = time.monotonic() + lease_seconds * RENEW_FRACTION
        with self._cond:
            self._ensure_thread()
            self._held[id(lease)] = lease
            # Wake the keeper only if this lease is due before its next planned wake-up:
            # a short task never costs a thread switch.
            if lease.renew_at < self._wake_at:
                self._cond.notify()
        return lease

    def drop(self, lease: HeldLease) -> None:
        with self._cond:
            self._held.pop(id(lease), None)

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._held = {}
            self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
            self._thread.start()

    def _due(self) -> tuple[list[HeldLease], float]:
        now = time.monotonic()
        due = [lease for lease in self._held.values() if lease.renew_at <= now]
        upcoming = [lease.renew_at for lease in self._held.values() if lease.renew_at > now]
        wait = min(upcoming) - now if upcoming else 60.0
        return due, wait

    def _loop(self) -> None:
        while True:
            with self._cond:
                due, wait = self._due()
                if not due:
                    self._wake_at = time.monotonic() + wait
                    self._cond.wait(timeout=wait)
                    self._wake_at = 0.0
                    continue
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: HeldLease) -> None:
        try:
            kept = self.store.run(
                lease.script,
                lease.keys,
                ["", lease.owner, str(lease.fence), lease.lease_seconds],
                "lease renew",
            )
        except BackendUnavailable as exc:
            # Try again soon; if the store stays away the lease lapses, which is safe.
            lease.renew_at = time.monotonic() + 1.0
            log.warning(f"{lease.kind}_renew_failed", key=lease.key, error=str(exc))
            return
        if not kept:
            lease.lost = True
            self.drop(lease)
            log.warning(f"{lease.kind}_lost", key=lease.key, fence=lease.fence)
            return
        lease.renew_at = time.monotonic() + lease.lease_seconds * RENEW_FRACTION
