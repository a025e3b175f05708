"""Samples the Redis server while a benchmarked worker runs.

Every ``interval`` seconds one pipeline reads ``INFO commandstats``, ``INFO cpu`` and
the run's queue length and unacked-message count, and psutil reads the CPU time of the
worker's processes: the samples give server commands (Lua ``redis.call`` commands
included), Redis CPU and worker CPU between any two instants; the queue and unacked
counts tell when the worker has finished. The bench's own commands (two ``INFO``, one
``LLEN`` and ``HLEN`` per sample) are subtracted from every delta.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import redis

from tests.support.fleet import Environment

SAMPLE_INTERVAL_SECONDS = 0.025
# Commands each sample sends, subtracted from the deltas.
OWN_COMMANDS = {"info": 2, "llen": 1, "hlen": 1}


@dataclass
class Sample:
    before: float
    after: float
    calls: dict[str, int]
    usec: dict[str, int]
    queued: int
    unacked: int
    redis_cpu: float
    worker_cpu: dict[int, float]


class CommandSampler(threading.Thread):
    """Background sampler of one run's Redis activity; stop it with :meth:`finish`."""

    def __init__(
        self,
        url: str,
        environment: Environment,
        worker_pid: Callable[[], int | None],
        interval: float = SAMPLE_INTERVAL_SECONDS,
    ) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.client = redis.Redis.from_url(url)
        self.queue_key = f"{environment.broker_prefix}{environment.queue}"
        self.unacked_key = f"{environment.broker_prefix}unacked"
        self.interval = interval
        self.worker_pid = worker_pid
        self.samples: list[Sample] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self._sample())
            self._halt.wait(self.interval)
        self.samples.append(self._sample())

    def _sample(self) -> Sample:
        pipe = self.client.pipeline(transaction=False)
        pipe.info("commandstats")
        pipe.info("cpu")
        pipe.llen(self.queue_key)
        pipe.hlen(self.unacked_key)
        before = time.time()
        stats, cpu, queued, unacked = pipe.execute()
        after = time.time()
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        usec = {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()}
        redis_cpu = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return Sample(
            before, after, calls, usec, int(queued), int(unacked), redis_cpu, self._worker_cpu()
        )

    def _worker_cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) of the worker's main process and pool children."""
        pid = self.worker_pid()
        if pid is None:
            return {}
        found: dict[int, float] = {}
        try:
            main = psutil.Process(pid)
            for proc in (main, *main.children()):
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    found[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
        return found

    def drained(self) -> bool:
        """Queue empty and nothing unacked in the last two samples: every message settled."""
        last = self.samples[-2:]
        return len(last) == 2 and all(s.queued == 0 and s.unacked == 0 for s in last)

    def finish(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.client.close()

    def between(self, start: float, end: float) -> Activity:
        """Server commands and CPU from just before ``start`` to just after ``end``.

        The bracketing samples are the last one finished before ``start`` and the first one
        begun after ``end``, so the window is covered at the cost of at most one sampling
        interval of idle worker activity on each side. The bench's commands are removed.
        """
        first = max((i for i, s in enumerate(self.samples) if s.after <= start), default=0)
        last = min(
            (i for i, s in enumerate(self.samples) if s.before >= end),
            default=len(self.samples) - 1,
        )
        a, b = self.samples[first], self.samples[last]
        delta: Counter[str] = Counter()
        for name, calls in b.calls.items():
            n = calls - a.calls.get(name, 0) - OWN_COMMANDS.get(name, 0) * (last - first)
            if n > 0:
                delta[name] = n
        usec: Counter[str] = Counter()
        for name in delta:
            usec[name] = b.usec.get(name, 0) - a.usec.get(name, 0)
        main = self.worker_pid()
        cpu = {"main": 0.0, "children": 0.0}
        for pid, seconds in b.worker_cpu.items():
            cpu["main" if pid == main else "children"] += seconds - a.worker_cpu.get(pid, 0.0)
        return Activity(
            delta, usec, b.redis_cpu - a.redis_cpu, cpu["main"], cpu["children"], b.before - a.after
        )


@dataclass
class Activity:
    """What the server and the worker did in a window (CPU in seconds)."""

    commands: Counter[str]
    # Server time spent in each command (a script's usec includes its redis.call commands).
    command_usec: Counter[str]
    redis_cpu: float
    worker_main_cpu: float
    worker_children_cpu: float
    seconds: float
