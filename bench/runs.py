"""One measured run: throughput of a no-op, and revival after a pool child is killed.

Throughput: ``tasks`` no-op messages are published to a fresh queue, then one worker
starts and drains it. The time is the worker's own, from the first task's start
(``task_prerun``) to the last task's end (``task_postrun``, after its result is stored),
so worker start-up and shutdown are not measured. Server commands (``INFO commandstats``)
and CPU are taken over that window; round trips (client side, every worker process) over
it and, per task, in its steady state (see :mod:`bench.roundtrips`).

Revival: one bare and one reliable prefork worker run side by side; a keyed task that
sleeps on its first delivery is sent, its pool child is SIGKILLed as soon as the task
has started, and the bench times the kill to the task's second start and to its finish.
Celery's prefork parent may notice a dead child only on its periodic pool maintenance
(every 5 s), so each kill comes after a random pause: the medians then average over that
timer's phase instead of repeating one phase.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench import childloss, marks, roundtrips
from bench.sampler import CommandSampler
from bench.stack import (
    BenchWorker,
    Stack,
    delete_prefix,
    delete_run_keys,
    publish,
    send,
    worker_env,
)
from tests.support.fleet import Environment, wait_until

# Round-trip kinds that are Celery task events (task-received/started/succeeded), which the
# worker buffers and flushes from its event loop rather than waiting on them per task.
EVENT_KINDS = frozenset({"PUBLISH"})
# Time allowed to drain a queue: a floor, plus a very pessimistic per-task allowance.
DRAIN_TIMEOUT_SECONDS = 60.0
DRAIN_SECONDS_PER_TASK = 0.05


@dataclass
class ThroughputRun:
    stack: str
    pool: str
    repetition: int
    tasks: int
    seconds: float
    # Task-path round trips over the whole window (for commands) and in steady state.
    round_trips: Counter[str] = field(default_factory=Counter)
    steady_round_trips: Counter[str] = field(default_factory=Counter)
    steady_tasks: int = 1
    background_round_trips: Counter[str] = field(default_factory=Counter)
    commands: Counter[str] = field(default_factory=Counter)
    command_usec: Counter[str] = field(default_factory=Counter)
    processes: int = 0
    # CPU seconds inside the window: Redis server, worker main process, pool children.
    redis_cpu: float = 0.0
    worker_main_cpu: float = 0.0
    worker_children_cpu: float = 0.0
    # Round trips of the bench process while it published the run's messages (the
    # producer's side: batched publishes, plus celery-once's locks).
    producer_round_trips: Counter[str] = field(default_factory=Counter)

    @property
    def sync_round_trips(self) -> Counter[str]:
        """Steady-state round trips without Celery's event publishes (buffered, flushed by
        the event loop, never waited on by a task)."""
        return Counter({k: v for k, v in self.steady_round_trips.items() if k not in EVENT_KINDS})

    @property
    def client_commands(self) -> Counter[str]:
        """Commands the worker processes sent (Lua-internal ones not included)."""
        return roundtrips.commands_of(self.round_trips + self.background_round_trips)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds

    def per_task(self, counter: Counter[str]) -> float:
        """Per task over the whole window (commands, background round trips)."""
        return sum(counter.values()) / self.tasks

    def rt_per_task(self, counter: Counter[str]) -> float:
        """Per task in steady state (task-path round trips)."""
        return sum(counter.values()) / self.steady_tasks

    def cpu_per_task(self) -> dict[str, float]:
        us = 1e6 / self.tasks
        return {
            "wall": round(self.seconds * us, 1),
            "redis": round(self.redis_cpu * us, 1),
            "worker_main": round(self.worker_main_cpu * us, 1),
            "worker_children": round(self.worker_children_cpu * us, 1),
        }

    def as_dict(self, names: dict[str, str]) -> dict[str, Any]:
        def per_task(
            counter: Counter[str], rename: bool, tasks: int | None = None
        ) -> dict[str, float]:
            items = (
                (roundtrips.readable(k, names) if rename else k, v)
                for k, v in counter.most_common()
            )
            return {k: round(v / (tasks or self.tasks), 4) for k, v in items}

        return {
            "stack": self.stack,
            "pool": self.pool,
            "repetition": self.repetition,
            "tasks": self.tasks,
            "seconds": round(self.seconds, 4),
            "tasks_per_second": round(self.rate, 1),
            "round_trips_per_task": round(self.rt_per_task(self.steady_round_trips), 3),
            "sync_round_trips_per_task": round(self.rt_per_task(self.sync_round_trips), 3),
            "steady_state_tasks": self.steady_tasks,
            "background_round_trips_per_task": round(self.per_task(self.background_round_trips), 3),
            "commands_per_task": round(self.per_task(self.commands), 3),
            "client_commands_per_task": round(self.per_task(self.client_commands), 3),
            "processes": self.processes,
            "cpu_microseconds_per_task": self.cpu_per_task(),
            "round_trips_by_kind": per_task(self.steady_round_trips, True, self.steady_tasks),
            "whole_window_round_trips_by_kind": per_task(self.round_trips, True),
            "background_round_trips_by_kind": per_task(self.background_round_trips, True),
            "producer_round_trips_per_task": round(self.per_task(self.producer_round_trips), 4),
            "producer_round_trips_by_kind": per_task(self.producer_round_trips, True),
            "commands_by_name": per_task(self.commands, False),
            "server_usec_by_command": per_task(self.command_usec, False),
        }


def measure_throughput(
    stack: Stack,
    pool: str,
    concurrency: int,
    tasks: int,
    repetition: int,
    redis_url: str,
    workdir: Path,
    log_level: str,
) -> ThroughputRun:
    environment = Environment(redis_url=redis_url)
    count_dir = workdir / f"{environment.name}-roundtrips"
    count_dir.mkdir()
    worker = BenchWorker(
        environment,
        stack,
        pool=pool,
        concurrency=concurrency,
        log_dir=workdir,
        log_level=log_level,
        **worker_env(count_dir),
    )
    try:
        with roundtrips.counting() as producer_round_trips:
            publish(environment, stack, tasks)
        sampler = CommandSampler(
            redis_url, environment, lambda: worker.proc.pid if worker.proc else None
        )
        sampler.start()
        try:
            worker.start(wait=False)
            wait_until(
                lambda: _drained(sampler, worker),
                timeout=DRAIN_TIMEOUT_SECONDS + tasks * DRAIN_SECONDS_PER_TASK,
                interval=0.02,
                message=f"{stack.name}/{pool} to drain {tasks} tasks",
            )
            worker.stop()
        finally:
            sampler.finish()
        counts = roundtrips.read(count_dir)
        if counts.tasks != tasks:
            raise RuntimeError(
                f"{stack.name}/{pool}: {counts.tasks} of {tasks} tasks ran;"
                f" worker log {worker.log_path}"
            )
        activity = sampler.between(counts.first_start, counts.last_end)
        run = ThroughputRun(
            stack=stack.name,
            pool=pool,
            repetition=repetition,
            tasks=tasks,
            seconds=counts.seconds,
            round_trips=counts.task_path,
            steady_round_trips=counts.steady,
            steady_tasks=counts.steady_tasks,
            background_round_trips=counts.background,
            commands=activity.commands,
            command_usec=activity.command_usec,
            processes=counts.processes,
            redis_cpu=activity.redis_cpu,
            worker_main_cpu=activity.worker_main_cpu,
            worker_children_cpu=activity.worker_children_cpu,
            producer_round_trips=producer_round_trips,
        )
    except BaseException:
        worker.kill()
        raise
    finally:
        delete_run_keys(redis_url, environment)
    worker.log_path.unlink(missing_ok=True)
    shutil.rmtree(count_dir, ignore_errors=True)
    return run


def _drained(sampler: CommandSampler, worker: BenchWorker) -> bool:
    if worker.proc is not None and worker.proc.poll() is not None:
        raise RuntimeError(f"worker exited early:\n{worker.log_text()[-3000:]}")
    return sampler.drained()


# -- revival ---------------------------------------------------------------------------------


@dataclass
class Revival:
    """One kill. Times are seconds from the SIGKILL; None when it did not happen."""

    stack: str
    repetition: int
    killed_pid: int
    noticed: float | None = None
    restarted: float | None = None
    finished: float | None = None
    revived_pid: int | None = None

    @property
    def noticed_to_restart(self) -> float | None:
        if self.noticed is None or self.restarted is None:
            return None
        return self.restarted - self.noticed

    def as_dict(self) -> dict[str, Any]:
        def r(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {
            "stack": self.stack,
            "repetition": self.repetition,
            "kill_to_noticed_seconds": r(self.noticed),
            "noticed_to_restart_seconds": r(self.noticed_to_restart),
            "kill_to_restart_seconds": r(self.restarted),
            "kill_to_finish_seconds": r(self.finished),
            "killed_pid": self.killed_pid,
            "revived_pid": self.revived_pid,
        }


class RevivalRig:
    """A prefork worker of one stack, kept running across revival repetitions."""

    def __init__(self, stack: Stack, redis_url: str, workdir: Path, concurrency: int) -> None:
        self.stack = stack
        self.environment = Environment(redis_url=redis_url)
        self.redis_url = redis_url
        self.loss_file = workdir / f"{self.environment.name}-child-loss.txt"
        # INFO: readiness is read from the worker's " ready." log line.
        self.worker = BenchWorker(
            self.environment,
            stack,
            pool="prefork",
            concurrency=concurrency,
            log_dir=workdir,
            log_level="INFO",
            BENCH_CHILD_LOSS_FILE=str(self.loss_file),
            **worker_env(),
        )
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.concurrency = concurrency

    def __enter__(self) -> RevivalRig:
        self.worker.start()
        self._wait_for_pool(exclude=None)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.worker.stop()
        finally:
            self.client.close()
            delete_prefix(self.redis_url, self.environment.prefix)
        if exc[0] is None:
            self.worker.log_path.unlink(missing_ok=True)
            self.loss_file.unlink(missing_ok=True)

    def _wait_for_pool(self, exclude: int | None) -> None:
        def full() -> bool:
            alive = [
                c
                for c in self.worker.children()
                if c.pid != exclude and c.is_running() and c.status() != "zombie"
            ]
            return len(alive) >= self.concurrency

        wait_until(full, timeout=30, interval=0.05, message=f"{self.stack.name} pool refilled")

    def revive_once(
        self, repetition: int, sleep_seconds: float, pause: float = 0.0, timeout: float = 60.0
    ) -> Revival:
        """Pause, send one task, SIGKILL its child once it started, time the revival."""
        key = f"rev-{repetition}-{uuid.uuid4().hex[:8]}"
        time.sleep(pause)
        prefix = self.environment.prefix
        send(self.environment, self.stack.sleep, [[key, sleep_seconds]])
        started = wait_until(
            lambda: marks.read(self.client, prefix, key),
            timeout=30,
            interval=0.005,
            message=f"{self.stack.name} revival task start",
        )
        killed = int(started[0]["pid"])
        killed_at = time.time()
        os.kill(killed, signal.SIGKILL)
        revival = Revival(self.stack.name, repetition, killed)
        try:
            wait_until(
                lambda: [m for m in marks.read(self.client, prefix, key) if m["event"] == "finish"],
                timeout=timeout,
                interval=0.005,
                message=f"{self.stack.name} revived",
            )
        except AssertionError:
            return revival
        found = marks.read(self.client, prefix, key)
        restart = next(m for m in found if m["event"] == "start" and m["pid"] != killed)
        finish = next(m for m in found if m["event"] == "finish")
        noticed = childloss.noticed_at(self.loss_file, killed)
        revival.noticed = None if noticed is None else noticed - killed_at
        revival.restarted = restart["t"] - killed_at
        revival.finished = finish["t"] - killed_at
        revival.revived_pid = int(finish["pid"])
        self._wait_for_pool(exclude=killed)
        return revival
