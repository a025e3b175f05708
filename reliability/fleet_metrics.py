"""Fleet-wide state as Prometheus gauges, read from Redis at scrape time.

Breaker states, limiter tokens, the DLQ's size by failure class, the degradation level,
parked messages and leases held are one fact for the whole fleet, kept in Redis: counting
them in every worker process would export them once per process (and disagree between
scrapes). So one collector reads them when scraped, registered only in the ops service's
``/metrics``. A store that does not answer yields ``reliable_fleet_store_up 0`` and no
other fleet sample (never stale numbers).

The DLQ's size by class is read from the entries themselves (one pass over the DLQ),
cached for ``dlq_cache_seconds`` so frequent scrapes do not re-read a large DLQ.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reliability.degradation import DegradationState
from reliability.dlq_digest import digests_of
from reliability.errors import BackendUnavailable
from reliability.metrics import PREFIX
from reliability.ratelimit import RateLimiter
from reliability.runtime import Runtime

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class FleetCollector(Collector):
    """Reads the fleet's shared state through the runtime (ops service only)."""

    def __init__(self, runtime: Runtime, dlq_cache_seconds: float = 10.0) -> None:
        self.rt = runtime
        self.dlq_cache_seconds = dlq_cache_seconds
        self._dlq: tuple[float, dict[str, int]] | None = None

    def describe(self) -> Iterator[Any]:
        return iter(())  # collected on demand only (nothing read at registration)

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            f"{PREFIX}_fleet_store_up", "1 when the fleet's state store answered this scrape."
        )
        try:
            families = list(self._families())
        except BackendUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[GaugeMetricFamily]:
        rt = self.rt
        state = GaugeMetricFamily(
            f"{PREFIX}_circuit_breaker_state",
            "Circuit breaker state fleet-wide (0 closed, 1 half-open, 2 open or forced open).",
            labels=["breaker"],
        )
        for breaker in rt.breakers:
            snap = breaker.snapshot()
            value = 2 if snap["mode"] == "forced_open" else BREAKER_STATES.get(snap["state"], 0)
            state.add_metric([breaker.name], value)
        yield state

        tokens = GaugeMetricFamily(
            f"{PREFIX}_rate_limit_available_tokens",
            "Tokens a fleet-wide rate limit can hand out now (per-tenant limits: none).",
            labels=["limit"],
        )
        for limit in rt.rate_limits.values():
            if limit.per in ("global", "task"):
                tokens.add_metric([limit.name], RateLimiter(rt.store, limit).available_tokens)
        yield tokens

        dlq = GaugeMetricFamily(
            f"{PREFIX}_dlq_size",
            "Entries in the dead-letter queue by failure class.",
            labels=["failure_class"],
        )
        for failure_class, count in sorted(self._dlq_by_class().items()):
            dlq.add_metric([failure_class], count)
        yield dlq

        status = DegradationState(rt.store).status()
        yield GaugeMetricFamily(
            f"{PREFIX}_degradation_level",
            "The fleet's degradation level (0 NORMAL, 1 MINOR, 2 MODERATE, 3 SEVERE, 4 CRITICAL).",
            value=status.level.rank,
        )

        keys = rt.store.keys

        now = rt.store.now()  # a lease is held until its expiry (Redis time)

        def counts(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.zcard(keys.parked)
            pipe.zcount(keys.leases, now, "+inf")
            return list(pipe.execute())

        parked, leases = rt.store.call("fleet metrics", counts)
        yield GaugeMetricFamily(
            f"{PREFIX}_parked_messages",
            "Messages parked in Redis until due (retries, deferrals).",
            value=int(parked),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_leases_held",
            "Idempotency leases held now (deliveries in progress fleet-wide).",
            value=int(leases),
        )

    def _dlq_by_class(self) -> dict[str, int]:
        now = time.monotonic()
        if self._dlq is not None and now - self._dlq[0] < self.dlq_cache_seconds:
            return self._dlq[1]
        # The digests parse only entries not seen before (reliability.dlq_digest).
        found = dict(Counter(d.failure_class for d in digests_of(self.rt).read(self.rt)))
        self._dlq = (now, found)
        return found
