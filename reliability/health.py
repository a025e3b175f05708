"""Health of the service's components: checked with their own timeouts, stored with history.

A *check* is a named probe (:mod:`reliability.probes`: the state store, the broker, each
downstream API, the workers' heartbeats, beat) with its own timeout. The
:class:`HealthChecker` runs every check at once, each on its own thread, and measures
its latency; a probe that raises is ``unhealthy`` (its error masked), one that raises
:class:`Degraded` or answers slower than ``slow_ms`` is ``degraded``, one still running
at its timeout is ``unhealthy`` ("timed out"). Running the checks never raises.

:class:`HealthBoard` stores the latest result per component in the hash ``P:health``
(field = component, value = JSON ``{"status", "latency_ms", "checked_at", "error"}`` —
the contract the degradation rules and the reports read) and every poll in the stream
``P:health:history``, capped at ``history`` polls.

Liveness and readiness follow seed 002: :func:`liveness` says the process answers (no
dependency is checked), :func:`readiness` aggregates the components — ``ready`` is false
when a *critical* component (by default the state store and the broker) is unhealthy;
any other component that is not healthy makes the status ``degraded`` only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from reliability.security import Masker
from reliability.store import Store

# A check answering slower than this (milliseconds) is degraded.
DEFAULT_SLOW_MS = 1000.0
# Polls kept in the history stream.
DEFAULT_HISTORY = 10_000
# Error texts are cut to this many characters.
MAX_ERROR_CHARS = 300


class Status(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


class Unhealthy(Exception):
    """Raised by a probe whose component does not work (the message says how)."""


class Degraded(Exception):
    """Raised by a probe whose component works, but not fully (a dead worker, a failed job)."""


# A probe returns a short description of what it saw ("PONG", "2 alive") or raises.
Probe = Callable[[], str]


@dataclass(frozen=True)
class Check:
    """One component to check: its name, its probe and how long the probe may take."""

    name: str
    probe: Probe
    timeout: float


@dataclass(frozen=True)
class ComponentHealth:
    """One component's result. ``detail`` says what the probe saw; ``error`` why it is
    not healthy (masked)."""

    name: str
    status: Status
    latency_ms: float
    checked_at: float
    error: str | None = None
    detail: str = ""

    def contract(self) -> dict[str, Any]:
        """The value stored in ``P:health`` (exactly these four fields)."""
        return {
            "status": self.status.value,
            "latency_ms": self.latency_ms,
            "checked_at": self.checked_at,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, name: str, text: str) -> ComponentHealth:
        """A stored result; one that does not parse (written by hand or damaged) reads as
        unhealthy, checked never — as a component nothing has checked lately does."""
        try:
            data = json.loads(text)
            return cls(
                name=name,
                status=Status(data["status"]),
                latency_ms=float(data["latency_ms"]),
                checked_at=float(data["checked_at"]),
                error=None if data.get("error") is None else str(data["error"]),
                detail=str(data.get("detail") or ""),
            )
        except Exception as exc:  # any JSON shape: a list, a number, a missing field, ...
            return cls(
                name, Status.UNHEALTHY, 0.0, 0.0, f"unreadable stored result ({type(exc).__name__})"
            )


class HealthChecker:
    """Runs checks concurrently, each bounded by its own timeout (module docstring)."""

    def __init__(
        self,
        checks: Iterable[Check],
        masker: Masker | None = None,
        *,
        slow_ms: float = DEFAULT_SLOW_MS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.checks = list(checks)
        self.masker = masker or Masker()
        self.slow_ms = slow_ms
        self.clock = clock

    def run(self) -> list[ComponentHealth]:
        """Every component's result, in the order of the checks."""
        results: dict[str, ComponentHealth] = {}
        threads: list[tuple[Check, threading.Thread, float]] = []
        for check in self.checks:
            thread = threading.Thread(
                target=self._one, args=(check, results), name=f"health-{check.name}", daemon=True
            )
            thread.start()
            threads.append((check, thread, time.monotonic()))
        for check, thread, started in threads:
            thread.join(max(check.timeout - (time.monotonic() - started), 0))
            if check.name not in results:  # a probe past its timeout is left to its own
                results[check.name] = ComponentHealth(  # socket timeouts, and not waited for
                    check.name,
                    Status.UNHEALTHY,
                    round(check.timeout * 1000, 3),
                    self.clock(),
                    f"timed out after {check.timeout:g}s",
                )
        return [results[check.name] for check in self.checks]

    def _one(self, check: Check, results: dict[str, ComponentHealth]) -> None:
        started = time.perf_counter()
        status, error, detail = Status.HEALTHY, None, ""
        try:
            detail = check.probe()
        except Degraded as exc:
            status, error = Status.DEGRADED, str(exc)
        except Unhealthy as exc:
            status, error = Status.UNHEALTHY, str(exc)
        except Exception as exc:
            status, error = Status.UNHEALTHY, f"{type(exc).__name__}: {exc}"
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if latency_ms > check.timeout * 1000:
            return  # too late: run() reports the timeout
        if status is Status.HEALTHY and latency_ms > self.slow_ms:
            status, error = Status.DEGRADED, f"slow: {latency_ms:.0f} ms > {self.slow_ms:g} ms"
        if error is not None:
            error = self.masker.text(" ".join(error.split()))[:MAX_ERROR_CHARS]
        results.setdefault(
            check.name,
            ComponentHealth(
                check.name, status, latency_ms, self.clock(), error, self.masker.text(detail)
            ),
        )


class HealthBoard:
    """The stored results: the latest per component, and the history of polls."""

    def __init__(self, store: Store, history: int = DEFAULT_HISTORY) -> None:
        self.store = store
        self.history_len = history
        self.key = f"{store.keys.prefix}:health"
        self.stream = f"{store.keys.prefix}:health:history"

    def record(self, results: Iterable[ComponentHealth]) -> None:
        """Store one poll: the contract hash and one history entry, in one transaction."""
        polled = list(results)
        if not polled:
            return
        latest = {r.name: json.dumps(r.contract()) for r in polled}
        entry = {r.name: json.dumps({**r.contract(), "detail": r.detail}) for r in polled}

        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.hset(self.key, mapping=latest)
            pipe.xadd(self.stream, entry, maxlen=self.history_len, approximate=False)
            pipe.execute()

        self.store.call("health record", write)

    def latest(
        self, stale_after: float | None = None, now: float | None = None
    ) -> dict[str, ComponentHealth]:
        """The last result of every component; with ``stale_after``, a result older than
        that many seconds counts as unhealthy (nothing has checked it lately)."""
        raw = cast("dict[str, str]", self.store.call("health read", lambda c: c.hgetall(self.key)))
        found = {name: ComponentHealth.from_json(name, text) for name, text in sorted(raw.items())}
        if stale_after is None:
            return found
        moment = time.time() if now is None else now
        for name, result in found.items():
            age = moment - result.checked_at
            if age > stale_after:
                found[name] = ComponentHealth(
                    name,
                    Status.UNHEALTHY,
                    result.latency_ms,
                    result.checked_at,
                    f"stale: last checked {age:.0f}s ago",
                )
        return found

    def history(self, count: int = 100, component: str | None = None) -> list[ComponentHealth]:
        """Results of the last ``count`` polls, newest first (of ``component`` only, when
        given)."""
        entries = cast(
            "list[tuple[str, dict[str, str]]]",
            self.store.call(
                "health history", lambda c: c.xrevrange(self.stream, "+", "-", count=count)
            ),
        )
        return [
            ComponentHealth.from_json(name, text)
            for _, fields in entries
            for name, text in fields.items()
            if component in (None, name)
        ]


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def overall(results: Iterable[ComponentHealth], critical: Collection[str]) -> tuple[Status, bool]:
    """``(status, ready)``: unhealthy and not ready when a critical component is unhealthy
    (or missing); degraded when any component is not healthy; else healthy."""
    found = {r.name: r for r in results}
    ready = all(name in found and found[name].status is not Status.UNHEALTHY for name in critical)
    if not ready:
        return Status.UNHEALTHY, False
    if any(r.status is not Status.HEALTHY for r in found.values()):
        return Status.DEGRADED, True
    return Status.HEALTHY, True


def readiness(
    results: Iterable[ComponentHealth], critical: Collection[str], *, version: str, environment: str
) -> dict[str, Any]:
    """Seed 002's full health (readiness) body: the overall status, ``ready``, and each
    component's status, latency and message. Serve it with 200 when ``ready``, else 503."""
    polled = list(results)
    status, ready = overall(polled, critical)
    return {
        "status": status.value,
        "ready": ready,
        "version": version,
        "environment": environment,
        "components": {
            r.name: {
                "status": r.status.value,
                "latency_ms": r.latency_ms,
                "message": r.error or r.detail or r.status.value,
                "checked_at": _iso(r.checked_at),
                "critical": r.name in critical,
            }
            for r in polled
        },
    }


def liveness(*, version: str, environment: str) -> dict[str, Any]:
    """Seed 002's quick health (liveness) body: the process answers; nothing else is
    checked, so a dependency's outage never restarts it."""
    return {"status": Status.HEALTHY.value, "version": version, "environment": environment}


def summary(results: Mapping[str, ComponentHealth] | Iterable[ComponentHealth]) -> dict[str, Any]:
    """Which components are not healthy (for the job ledger and logs)."""
    polled = list(results.values()) if isinstance(results, Mapping) else list(results)
    return {
        "unhealthy": [r.name for r in polled if r.status is Status.UNHEALTHY],
        "degraded": [r.name for r in polled if r.status is Status.DEGRADED],
    }
