"""Maintenance jobs that run once per schedule slot, with a ledger of their runs.

Beat sends each maintenance job on its interval. celery-redbeat keeps a second beat
process from scheduling at the same time, but a message can still arrive twice: a beat
that lost its lock while sending, a redelivered message, an operator running a job by
hand. So a job claims its *slot* — ``floor(now / interval)`` — with ``SET NX`` before it
does anything; a second run for the same slot finds the claim and does nothing. A run
that crashes keeps its claim: that slot's work is skipped, the next slot runs (a
maintenance job must never do its work twice; it is fine to skip one).

Every run that did its work is appended to the job ledger (a Redis stream, trimmed to
the configured history) with its slot, status, duration and a masked summary of its
result; the last run of each job is kept in a hash for health checks and the ops API.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import structlog

from reliability import metrics
from reliability.security import Masker
from reliability.store import Store

log = structlog.get_logger("reliability.jobs")

JobResult = Mapping[str, Any]


def slot_of(now: float, every: float) -> int:
    """The schedule slot ``now`` falls in for a job run every ``every`` seconds."""
    return math.floor(now / every)


@dataclass
class JobRun:
    """One run of a job for one slot."""

    job: str
    slot: int
    status: str  # "ok" or "failed"
    started_at: float
    finished_at: float
    worker: str
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobRun:
        data = json.loads(text)
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})

    @classmethod
    def read(cls, text: str) -> JobRun | None:
        """A stored run, or None (logged) for one that does not parse — written by hand or
        damaged: one bad record must not fail `reliable jobs` or the health endpoints."""
        try:
            run = cls.from_json(text)
        except Exception as exc:  # any JSON shape: a list, a number, ...
            log.warning("job_run_unreadable", error=type(exc).__name__)
            return None
        if not isinstance(run.job, str) or not isinstance(run.finished_at, int | float):
            log.warning("job_run_unreadable", error="fields of the wrong type")
            return None
        return run


class Jobs:
    """Claims slots and records runs (see the module docstring)."""

    def __init__(self, store: Store, masker: Masker | None = None, history: int = 10_000) -> None:
        self.store = store
        self.masker = masker or Masker()
        self.history = history
        self.stream = f"{store.keys.prefix}:jobs"
        self.last = f"{store.keys.prefix}:jobs:last"
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def _claim_key(self, job: str, slot: int) -> str:
        return f"{self.store.keys.prefix}:job:{job}:{slot}"

    def claim(self, job: str, slot: int, every: float) -> bool:
        """Take ``job``'s ``slot``; False when some run already took it."""
        ttl = max(60, math.ceil(every * 2))
        key = self._claim_key(job, slot)
        taken = self.store.call("job claim", lambda c: c.set(key, self.identity, nx=True, ex=ttl))
        return bool(taken)

    def run_once(
        self,
        job: str,
        every: float,
        fn: Callable[[], JobResult],
        *,
        now: float | None = None,
        slot: int | None = None,
    ) -> JobRun | None:
        """Run ``fn`` for the current slot unless that slot already ran; the run, or None.

        A failing ``fn`` is recorded as ``failed`` (its error masked) and not raised: a
        maintenance job that fails must not become a retried task that does its work
        twice; the next slot tries again.
        """
        moment = time.time() if now is None else now
        slot = slot_of(moment, every) if slot is None else slot
        if not self.claim(job, slot, every):
            log.info("job_slot_already_run", job=job, slot=slot)
            metrics.JOB_RUNS.labels(job, "skipped").inc()
            return None
        started = time.time()
        status, result, error = "ok", {}, None
        try:
            result = dict(fn() or {})
        except Exception as exc:
            status, error = "failed", self.masker.text(f"{type(exc).__name__}: {exc}")
            log.exception("job_failed", job=job, slot=slot)
        run = JobRun(
            job=job,
            slot=slot,
            status=status,
            started_at=started,
            finished_at=time.time(),
            worker=self.identity,
            result=self.masker.data(result),
            error=error,
        )
        self._record(run)
        metrics.JOB_RUNS.labels(job, status).inc()
        log.info(
            "job_ran",
            job=job,
            slot=slot,
            status=status,
            seconds=round(run.finished_at - run.started_at, 3),
        )
        return run

    def _record(self, run: JobRun) -> None:
        text = run.to_json()

        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.xadd(self.stream, {"run": text}, maxlen=self.history, approximate=True)
            pipe.hset(self.last, run.job, text)
            pipe.execute()

        self.store.call("job record", write)

    def runs(self, job: str | None = None, count: int = 100) -> list[JobRun]:
        """The newest runs first (of ``job`` only, when given), at most ``count``."""
        found: list[JobRun] = []
        last_id = "+"
        while len(found) < count:
            batch: list[Any] = self.store.call(
                "job runs", functools.partial(_newest, self.stream, last_id)
            )
            if not batch:
                break
            for entry_id, fields in batch:
                if entry_id == last_id:
                    continue
                run = JobRun.read(fields.get("run", ""))
                if run is not None and (job is None or run.job == job):
                    found.append(run)
            if len(batch) < 500:
                break
            last_id = batch[-1][0]
        return found[:count]

    def latest(self) -> dict[str, JobRun]:
        """The last run of every job that ran."""
        raw = cast("dict[str, str]", self.store.call("job last", lambda c: c.hgetall(self.last)))
        runs = {name: JobRun.read(text) for name, text in sorted(raw.items())}
        return {name: run for name, run in runs.items() if run is not None}


def _newest(stream: str, top: str, client: Any) -> Any:
    return client.xrevrange(stream, top, "-", count=500)
