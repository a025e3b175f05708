"""What the ops service shows, read from the state store (no process-local state).

Each function returns plain JSON-ready data; the health and admin routes and the
dashboard share them, so an endpoint and the page never disagree.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from typing import Any

from reliability.breaker import CircuitBreaker
from reliability.breaker.monitor import BreakerMonitor
from reliability.degradation import DegradationState
from reliability.dlq import DeadLetter
from reliability.dlq_digest import digests_of
from reliability.ratelimit import RateLimiter
from reliability.runtime import Runtime


def breakers(rt: Runtime) -> list[dict[str, Any]]:
    """Every breaker as :func:`breaker` shows it."""
    monitor, moment = BreakerMonitor(rt.store, []), rt.store.now()
    return [breaker(rt, b, monitor, moment) for b in rt.breakers]


def breaker(
    rt: Runtime,
    found: CircuitBreaker,
    monitor: BreakerMonitor | None = None,
    moment: float | None = None,
) -> dict[str, Any]:
    """A breaker's state and mode, consecutive failures, and its window's failure and
    slow-call rates: the breaker monitor's reading (two reads, nothing recorded). A
    forced-open breaker reads "open", as the fleet treats it."""
    monitor = monitor or BreakerMonitor(rt.store, [])
    seen = monitor.snapshot(found, rt.store.now() if moment is None else moment)
    return {
        "name": seen.breaker,
        "state": "open" if seen.mode == "forced_open" else seen.state,
        "mode": seen.mode,
        "open_until": seen.open_until,
        "failure_count": seen.failure_count,
        "failure_rate": seen.failure_rate,
        "slow_call_rate": seen.slow_call_rate,
        "window_calls": seen.window_calls,
    }


def limits(rt: Runtime) -> list[dict[str, Any]]:
    out = []
    for limit in rt.rate_limits.values():
        limiter = RateLimiter(rt.store, limit)
        current = limiter.current()
        scoped = limit.per not in ("global", "task")
        out.append(
            {
                "name": limit.name,
                "kind": current.kind,
                "per": current.per,
                "rate": current.rate,
                "burst": current.burst,
                "max_requests": current.max_requests,
                "window_seconds": current.window_seconds,
                "limit": current.limit,
                "changed_at_runtime": current != limit,
                # Per-scope limits have a bucket per tenant/user/...: no one number.
                "available": None if scoped else round(limiter.available_tokens, 3),
            }
        )
    return out


def workers(rt: Runtime) -> list[dict[str, Any]]:
    keys = rt.store.keys

    def read(client: Any) -> list[dict[str, Any]]:
        registered = client.hgetall(keys.workers)
        pipe = client.pipeline(transaction=False)
        names = sorted(registered)
        for name in names:
            pipe.pttl(keys.heartbeat(name))
        ttls = pipe.execute()
        rows = []
        for name, ttl in zip(names, ttls, strict=True):
            try:
                info = json.loads(registered[name])
            except ValueError:
                info = {}
            rows.append({"id": name, **info, "alive": ttl is not None and ttl > 0})
        return rows

    found: list[dict[str, Any]] = rt.store.call("workers", read)
    return found


def dlq_summary(rt: Runtime) -> dict[str, Any]:
    """Totals by failure class and by error fingerprint, and the oldest entry's age
    (only entries this process has not seen yet are read: :mod:`reliability.dlq_digest`)."""
    by_class: Counter[str] = Counter()
    groups: dict[str, dict[str, Any]] = {}
    oldest = None
    for entry in digests_of(rt).read(rt):
        by_class[entry.failure_class] += 1
        key = entry.fingerprint
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "fingerprint": key,
                "label": entry.label,
                "count": 0,
                "tasks": Counter(),
                "newest_id": entry.id,
            }
        group["count"] += 1
        group["tasks"][entry.task_name] += 1
        if entry.first_failure_at > 0:  # an unreadable envelope's stand-in has no time
            oldest = min(oldest or entry.first_failure_at, entry.first_failure_at)
    ranked = sorted(groups.values(), key=lambda g: -int(g["count"]))
    for group in ranked:
        group["tasks"] = dict(group["tasks"].most_common(5))
    return {
        "total": sum(by_class.values()),
        "by_class": dict(by_class),
        "oldest_age_seconds": None if oldest is None else round(time.time() - oldest, 3),
        "groups": ranked[:50],
    }


def dlq_entry(entry: DeadLetter) -> dict[str, Any]:
    data = json.loads(entry.to_json())
    data["fingerprint"] = entry.fingerprint
    return data


def degradation(rt: Runtime) -> dict[str, Any]:
    """The fleet's degradation level in force (override and expiry on Redis time)."""
    found: dict[str, Any] = DegradationState(rt.store).status().as_dict()
    return found


def ledger_row(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger record with its numbers as numbers (the stream stores strings)."""
    typed: dict[str, Any] = dict(row)
    for name, kind in (("at", float), ("attempt", int)):
        # A record written by an older version is shown as stored.
        with contextlib.suppress(KeyError, ValueError, TypeError):
            typed[name] = kind(typed[name])
    return typed
