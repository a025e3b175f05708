"""Utilisation of a global rate limit: calls admitted / calls allowed, with a fleet.

A fleet of prefork workers runs ``bench.limited_noop`` (a global GCRA limit, ``rate`` per
second, ``burst``), fed more work than the limit allows for the whole window:

- ``flood``: ``overload x rate x window`` messages are queued before the workers start
  (the issue's flooding tenant): each is admitted now or reserved a future slot and
  parked until then;
- ``steady``: a producer publishes ``overload x rate`` messages per second for the window
  (bounded in count and time), so new work keeps arriving behind the parked copies.

Every task stamps its start on Redis time. From the first start ``t0``, GCRA allows
``burst`` calls at once and one per ``1/rate`` after: ``rate x window + burst - 1``
starts in ``[t0, t0 + window)``. Utilisation is the stamps in that window over that.
The densest 1-second span is reported too (it must not exceed ``rate + burst - 1``).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import guard_settings
from bench.stack import LIMITED, BenchWorker, delete_run_keys, producer, send, worker_env
from tests.support.fleet import Environment, wait_until

# How long the run may take beyond the window (start-up, the last stamps).
EXTRA_SECONDS = 60.0


@dataclass
class Utilisation:
    feed: str
    rate: float
    burst: int
    window_seconds: float
    workers: int
    concurrency: int
    published: int
    stamps: list[float] = field(default_factory=list)

    @property
    def allowed(self) -> float:
        return self.rate * self.window_seconds + self.burst - 1

    @property
    def t0(self) -> float:
        return self.stamps[0]

    @property
    def admitted(self) -> int:
        return bisect.bisect_left(self.stamps, self.t0 + self.window_seconds)

    @property
    def ratio(self) -> float:
        return self.admitted / self.allowed

    def per_second(self) -> list[int]:
        counts = [0] * math.ceil(self.window_seconds)
        for t in self.stamps[: self.admitted]:
            counts[min(int(t - self.t0), len(counts) - 1)] += 1
        return counts

    def densest_second(self) -> int:
        """The most starts in any 1-second span (two pointers over the sorted stamps)."""
        best, lo = 0, 0
        for hi, t in enumerate(self.stamps):
            while t - self.stamps[lo] >= 1.0:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def as_dict(self) -> dict[str, Any]:
        return {
            "feed": self.feed,
            "rate_per_second": self.rate,
            "burst": self.burst,
            "window_seconds": self.window_seconds,
            "workers": self.workers,
            "concurrency": self.concurrency,
            "published": self.published,
            "started_in_window": self.admitted,
            "allowed_in_window": self.allowed,
            "utilisation": round(self.ratio, 4),
            "per_second": self.per_second(),
            "densest_second": self.densest_second(),
            "densest_second_allowed": self.rate + self.burst - 1,
            "stamps_total": len(self.stamps),
        }


def _stamps(client: redis.Redis, key: str) -> list[float]:
    return sorted(float(x) for x in client.lrange(key, 0, -1))


def measure_utilisation(
    redis_url: str,
    workdir: Path,
    *,
    feed: str,
    rate: float,
    burst: int,
    window_seconds: float,
    overload: float,
    workers: int,
    concurrency: int,
    log_level: str,
) -> Utilisation:
    environment = Environment(redis_url=redis_url)
    env = worker_env(utilisation_rate=rate, utilisation_burst=burst)
    fleet = [
        BenchWorker(
            environment,
            LIMITED,
            pool="prefork",
            concurrency=concurrency,
            log_dir=workdir,
            log_level=log_level,
            name=f"limited-{n}",
            **env,
        )
        for n in range(workers)
    ]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    key = guard_settings.admitted_key(environment.prefix)
    count = math.ceil(overload * rate * window_seconds) + burst
    result = Utilisation(feed, rate, burst, window_seconds, workers, concurrency, count)
    halt = threading.Event()
    feeder: threading.Thread | None = None
    try:
        if feed == "flood":
            send(environment, LIMITED.noop, [[i] for i in range(count)])
            for worker in fleet:
                worker.start(wait=False)
            for worker in fleet:
                worker.wait_ready()
        else:
            for worker in fleet:
                worker.start()
            feeder = threading.Thread(
                target=_feed,
                name="bench-feeder",
                daemon=True,
                args=(environment, count, overload * rate, halt),
            )
            feeder.start()

        def window_done() -> bool:
            stamps = _stamps(client, key)
            return bool(stamps) and stamps[-1] >= stamps[0] + window_seconds

        wait_until(
            window_done,
            timeout=window_seconds * (1 + overload) + EXTRA_SECONDS,
            interval=0.25,
            message=f"{window_seconds} s of admissions ({feed})",
        )
        result.stamps = _stamps(client, key)
    finally:
        halt.set()
        if feeder is not None:
            feeder.join(timeout=30)
        # The measurement is over: no need to wait for a warm shutdown of the backlog
        # (the run's keys, queue and parked messages are deleted next).
        for worker in fleet:
            worker.kill()
        client.close()
        delete_run_keys(redis_url, environment)
    for worker in fleet:
        worker.log_path.unlink(missing_ok=True)
    return result


def _feed(environment: Environment, count: int, per_second: float, halt: threading.Event) -> None:
    """Publish ``count`` messages at ``per_second``, in small batches on a fixed schedule."""
    app = producer(environment)
    batch = max(1, round(per_second / 20))  # 20 batches a second
    started = time.monotonic()
    sent = 0
    try:
        with app.producer_or_acquire() as prod:
            while sent < count and not halt.is_set():
                due = started + sent / per_second
                pause = due - time.monotonic()
                if pause > 0:
                    halt.wait(pause)
                for i in range(sent, min(sent + batch, count)):
                    app.send_task(LIMITED.noop, args=[i], producer=prod)
                sent = min(sent + batch, count)
    finally:
        app.close()
