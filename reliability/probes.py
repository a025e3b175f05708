"""The probes behind each health check (:mod:`reliability.health`), and beat's pulse.

Each ``*_probe`` function returns a :data:`~reliability.health.Probe`: a callable that
answers what it saw (``"PONG"``, ``"2 alive"``), raises :class:`~reliability.health.Degraded`
when the component works only in part, and :class:`~reliability.health.Unhealthy` (or
any other error) when it does not work.
Probes open their own short-lived connections with the check's timeout, so a slow or
dead component never holds a shared client.

* the state store and a Redis broker: connect and ``PING``;
* an AMQP broker: connect and open (and close) a channel — the cheapest round trip
  that proves the broker serves this vhost and credentials;
* a downstream API: ``GET`` its probe endpoint; 2xx/3xx is healthy;
* the workers: their heartbeat keys (:mod:`reliability.heartbeat`) — none alive is
  unhealthy, fewer than ``min_workers`` or one registered whose heartbeat expired
  (not yet revived by the fleet) is degraded;
* beat: the pulse key the active beat sets on every scheduler tick (:class:`BeatPulse`,
  with a TTL, so its age needs no clock), plus the job ledger's last runs — a job whose
  last run failed, or that has not run for two intervals, is degraded.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import certifi
import httpx
import redis
from kombu import Connection

from reliability.health import Degraded, Probe, Unhealthy
from reliability.jobs import Jobs
from reliability.store import Store

REDIS_FORMS = ("redis://", "rediss://", "unix://")
# Broker URL forms naming a unix socket (kombu's, and this project's transport alias).
SOCKET_FORMS = ("redis+socket://", "reliable+socket://", "socket://")
AMQP_FORMS = ("amqp://", "amqps://", "pyamqp://")
# A job is overdue when its last run is older than this many intervals (plus the beat
# staleness allowance).
OVERDUE_INTERVALS = 2


def redis_url_of(url: str) -> str:
    """A redis-py URL for a Redis URL in any of kombu's forms (``redis+socket://`` ...)."""
    for form in SOCKET_FORMS:
        if url.startswith(form):
            return "unix://" + url[len(form) :]
    return url


def redis_probe(url: str, timeout: float) -> Probe:
    """Connect to the Redis at ``url`` and ``PING`` it."""

    def probe() -> str:
        client = redis.Redis.from_url(
            redis_url_of(url), socket_timeout=timeout, socket_connect_timeout=timeout
        )
        try:
            return "PONG" if client.ping() else "no PONG"
        finally:
            client.close()

    return probe


def broker_probe(url: str, timeout: float) -> Probe:
    """A Redis broker: ``PING``; an AMQP broker: connect and open a channel."""
    if url.startswith(REDIS_FORMS + SOCKET_FORMS):
        return redis_probe(url, timeout)
    if not url.startswith(AMQP_FORMS):

        def unsupported() -> str:
            raise Unhealthy(f"no probe for broker URL scheme {url.split(':', 1)[0]!r}")

        return unsupported

    def probe() -> str:
        with Connection(url, connect_timeout=timeout, heartbeat=0) as connection:
            connection.connect()
            channel: Any = connection.channel()  # a round trip: channel.open / open-ok
            channel.close()
        return "channel opened"

    return probe


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context per process: building one (loading the CA bundle) takes tens of
    milliseconds, which would otherwise be measured as the provider's latency."""
    return ssl.create_default_context(cafile=certifi.where())


def http_probe(url: str, timeout: float) -> Probe:
    """``GET url``: healthy on 2xx/3xx, else the status is the error. No credentials are
    sent (a probe endpoint needs none)."""
    tls = _tls()

    def probe() -> str:
        with httpx.Client(verify=tls, timeout=timeout, follow_redirects=False) as client:
            reply = client.get(url)
        if reply.status_code >= 400:
            raise Unhealthy(f"HTTP {reply.status_code}")
        return f"HTTP {reply.status_code}"

    return probe


def workers_probe(store: Store, min_workers: int = 1) -> Probe:
    """The workers whose heartbeat key is alive (see the module docstring)."""
    keys = store.keys

    def read(client: Any) -> tuple[list[str], list[Any]]:
        registered = sorted(client.hkeys(keys.workers))
        pipe = client.pipeline(transaction=False)
        for worker in registered:
            pipe.exists(keys.heartbeat(worker))
        return registered, pipe.execute() if registered else []

    def probe() -> str:
        registered, alive = store.call("health workers", read)
        dead = [w for w, up in zip(registered, alive, strict=True) if not up]
        live = len(registered) - len(dead)
        seen = f"{live} alive" + (f", {len(dead)} dead ({', '.join(dead[:5])})" if dead else "")
        if live == 0:
            raise Unhealthy(f"no live worker: {seen}")
        if live < min_workers or dead:
            raise Degraded(seen + (f", fewer than {min_workers}" if live < min_workers else ""))
        return seen

    return probe


class BeatPulse:
    """What the active beat sets on every scheduler tick: ``P:beat:alive`` = its identity,
    expiring after ``stale_seconds`` (so the key's remaining TTL tells its age)."""

    def __init__(self, store: Store, stale_seconds: float) -> None:
        self.store = store
        self.stale_seconds = stale_seconds
        self.key = f"{store.keys.prefix}:beat:alive"
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def beat(self) -> None:
        ttl_ms = max(int(self.stale_seconds * 1000), 1)
        self.store.call("beat pulse", lambda c: c.set(self.key, self.identity, px=ttl_ms))

    def age(self) -> tuple[str, float] | None:
        """``(identity, seconds since the last tick)``, or None when none in the window."""

        def read(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.get(self.key)
            pipe.pttl(self.key)
            return list(pipe.execute())

        identity, pttl = self.store.call("beat pulse read", read)
        if identity is None or pttl is None or pttl < 0:
            return None
        return str(identity), max(self.stale_seconds - pttl / 1000, 0.0)


def beat_probe(pulse: BeatPulse, jobs: Jobs, intervals: Mapping[str, float]) -> Probe:
    """Beat's pulse, and each job's last run (see the module docstring)."""

    def probe() -> str:
        seen = pulse.age()
        if seen is None:
            raise Unhealthy(f"no beat tick in the last {pulse.stale_seconds:g}s")
        identity, age = seen
        now = pulse.store.now()
        problems = []
        for name, run in jobs.latest().items():
            if run.status != "ok":
                problems.append(f"job {name} failed: {run.error or 'no detail'}")
            every = intervals.get(name)
            if every is not None:
                late = now - run.started_at - OVERDUE_INTERVALS * every - pulse.stale_seconds
                if late > 0:
                    problems.append(f"job {name} overdue by {late:.0f}s")
        seen_text = f"ticked {age:.1f}s ago ({identity})"
        if problems:
            raise Degraded(f"{seen_text}; " + "; ".join(problems))
        return seen_text

    return probe


def touch(path: str | os.PathLike[str]) -> None:
    """Create ``path`` or set its modification time to now (a liveness file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()  # an existing file gets the current time
