"""Admission latency: the fused admission script against a single Redis ``SET``.

From the bench process, in one tight loop that rotates through the series (so all see
the same server and machine load), time client-side:

- the admission the pipeline runs for a task with idempotency + degradation level +
  breaker + limit (the judged series): the script
  :func:`reliability.admission.assemble` builds from the same fragments in the same
  order, called through :class:`reliability.store.Store` (``EVALSHA``), with the same
  keys and arguments the pipeline passes (the bench's breaker and never-delaying limit,
  the testing environment's lease and result TTLs). Every call has a fresh idempotency
  key, so every call takes a lease, reads the degradation level (NORMAL: it runs),
  checks the breaker and reserves a token;
- ``SET`` of one small key on the same client;
- references showing where the time goes: the admission with idempotency only, with
  idempotency + breaker and with idempotency + breaker + limit (no degradation plan), and
  an ``EVALSHA`` of a script that only reads the clock.

Percentiles in microseconds; the target is admission p99 <= 1.5 x the SET's p99.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench import guard_settings
from bench.stack import delete_prefix
from config import Settings
from reliability import admission, idempotency, ratelimit, scripts
from reliability.breaker.guard import ADMISSION
from reliability.degradation import guard as degradation
from reliability.degradation.guard import check_plan
from reliability.degradation.state import degradation_key
from reliability.runtime import Runtime
from reliability.scripts import Part
from reliability.store import Store
from worker.celeryconfig import breaker_configs, rate_limits, runtime_config

TASK = "bench.guarded_noop"
PERCENTILES = (50, 90, 99, 99.9)
TARGET_P99_RATIO = 1.5
# The judged series, and references that show where the time goes: the same admission
# with fewer guards, and an EVALSHA of a script that only reads the clock (the prelude).
GUARDS = {
    "idempotency": ("idempotency",),
    "idempotency+breaker": ("idempotency", "breaker"),
    "idempotency+breaker+limits": ("idempotency", "breaker", "limits"),
    "idempotency+degradation+breaker+limits": ("idempotency", "degradation", "breaker", "limits"),
}
JUDGED = "admission(idempotency+degradation+breaker+limits)"
NOOP_SCRIPT = scripts.compose(body="return 1")


@dataclass
class Latency:
    """Client-side samples (microseconds) of each series, taken in rotating order."""

    iterations: int
    warmup: int
    script_sha: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def percentiles(samples: list[float]) -> dict[str, float]:
        cuts = statistics.quantiles(samples, n=1000, method="inclusive")
        out = {f"p{p:g}": round(cuts[int(p * 10) - 1], 1) for p in PERCENTILES}
        out["max"] = round(max(samples), 1)
        out["mean"] = round(statistics.fmean(samples), 1)
        return out

    @property
    def p99_ratio(self) -> float:
        return (
            self.percentiles(self.samples[JUDGED])["p99"]
            / self.percentiles(self.samples["SET"])["p99"]
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "warmup": self.warmup,
            "admission_script": {"sha": self.script_sha, "series": JUDGED},
            "verdicts": self.verdicts,
            "admission_us": self.percentiles(self.samples[JUDGED]),
            "set_us": self.percentiles(self.samples["SET"]),
            "series_us": {name: self.percentiles(v) for name, v in self.samples.items()},
            "p99_ratio": round(self.p99_ratio, 3),
            "target_p99_ratio": TARGET_P99_RATIO,
            "meets_target": self.p99_ratio <= TARGET_P99_RATIO,
        }


def _runtime(redis_url: str, prefix: str) -> Runtime:
    """The runtime a bench worker builds (testing environment, the bench's guards)."""
    settings = Settings(
        environment="testing",
        redis={"url": redis_url, "key_prefix": prefix},
        breakers=guard_settings.BREAKERS,
        rate_limits=guard_settings.rate_limits(),
    )
    return Runtime(
        Store(redis_url, prefix),
        runtime_config(settings),
        breakers=breaker_configs(settings),
        rate_limits=rate_limits(settings),
    )


def _admission_call(
    rt: Runtime, n: int, guards: tuple[str, ...]
) -> tuple[str, list[str], list[Any]]:
    """Script, KEYS and ARGV of delivery ``n`` of a task declaring ``guards``, built as
    ``Pipeline._admit`` builds them (in its order: idempotency, degradation, breaker,
    limits)."""
    keys, cfg, tag = rt.store.keys, rt.config, guard_settings.BREAKER
    # Each series keys its own calls (a key shared with another series would be busy).
    arguments = {"i": n, "series": "+".join(guards)}
    key = idempotency.derive_key(TASK, arguments, None, ())
    task_id = uuid.uuid4().hex
    owner = f"bench@host:{n}:{task_id}"
    limit = rt.rate_limit(guard_settings.LIMIT)
    breaker = rt.breakers.get(guard_settings.BREAKER)
    breaker_keys, breaker_args = breaker.keys, [breaker.name, *breaker.config.args(), owner]
    limit_keys, limit_args = ratelimit.admission_args(
        rt.store, TASK, [limit], owner, None, lambda: arguments
    )
    every = {
        "idempotency": Part(
            idempotency.FRAGMENT,
            [keys.idem(tag, key), keys.leases],
            [
                idempotency.fingerprint(arguments),
                owner,
                cfg.lease_seconds,
                int(cfg.result_ttl_seconds),
                str(n),
            ],
        ),
        "breaker": Part(ADMISSION, breaker_keys, breaker_args),
        "limits": Part(ratelimit.fragment(1), limit_keys, limit_args),
        "degradation": Part(
            degradation.ADMISSION,
            [degradation_key(rt.store), ""],
            [check_plan(TASK, guard_settings.DEGRADATION)],
        ),
    }
    parts = [every[g] for g in guards]
    script, all_keys, all_args = admission.layout(
        parts,
        ledger=keys.ledger,
        ledger_max=cfg.ledger_max_len,
        task_id=task_id,
        name=TASK,
        attempt=1,
        dlv_ttl_ms=int(cfg.delivery_ttl_seconds * 1000),
    )
    return script.source, all_keys, all_args


def measure_latency(redis_url: str, iterations: int, warmup: int) -> Latency:
    prefix = "b" + uuid.uuid4().hex[:10]
    rt = _runtime(redis_url, prefix)
    store = rt.store
    script, _, _ = _admission_call(rt, -1, GUARDS[JUDGED[len("admission(") : -1]])
    result = Latency(iterations, warmup, store.script(script).sha)
    set_key = f"{prefix}:bench:set"
    client = store.client
    clock = time.perf_counter_ns

    def timed(name: str, n: int) -> float:
        if name == "SET":
            value = str(n)
            t0 = clock()
            client.set(set_key, value)
            return (clock() - t0) / 1000
        if name == "EVALSHA clock only":
            t0 = clock()
            store.run(NOOP_SCRIPT, [], [""], "noop")
            return (clock() - t0) / 1000
        lua, keys, args = _admission_call(rt, n, GUARDS[name[len("admission(") : -1]])
        t0 = clock()
        reply = store.run(lua, keys, args, "admission")
        elapsed = (clock() - t0) / 1000
        if n >= warmup:
            verdict = f"{name}: {admission.parse(reply).decision}"
            result.verdicts[verdict] = result.verdicts.get(verdict, 0) + 1
        return elapsed

    names = ["SET", "EVALSHA clock only", *(f"admission({g})" for g in GUARDS)]
    result.samples = {name: [] for name in names}
    try:
        for n in range(warmup + iterations):
            # Rotate the order, so no series always follows the same other one.
            k = n % len(names)
            for name in names[k:] + names[:k]:
                elapsed = timed(name, n)
                if n >= warmup:
                    result.samples[name].append(elapsed)
    finally:
        delete_prefix(redis_url, prefix)
        store.close()
    return result
