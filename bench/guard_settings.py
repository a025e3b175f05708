"""The guards ``python -m bench.guards`` declares, as the benchmarked workers read them.

Side-effect free (imported by the bench process and by the workers' task module alike):
the names, the ``RELIABLE_BREAKERS`` / ``RELIABLE_RATE_LIMITS`` settings every bench
worker gets, and the one-line Lua script the utilisation task stamps its start with.
"""

from __future__ import annotations

import json
from typing import Any

from reliability import scripts

BREAKER = "bench-breaker"
# A limit generous enough never to delay a task: it is checked and reserved on every
# admission, but a 1000-token bucket refilled at a million per second is never empty.
LIMIT = "bench-limit"
LIMIT_RATE = 1_000_000.0
LIMIT_BURST = 1000
# A degradation plan (issue 8): read at every admission; at NORMAL the task runs.
DEGRADATION = {"SEVERE": "defer", "CRITICAL": "skip"}
# The global limit whose utilisation is measured (rate per second, burst), by default.
UTILISATION_LIMIT = "bench-global"
UTILISATION_RATE = 100.0
UTILISATION_BURST = 1

# Every trip rule the breaker has, so a success runs all of its bookkeeping: consecutive
# failures, a failure rate and a slow-call rate over a count window (resilience4j's
# defaults: 100 calls, 50 %, at least 10 calls).
BREAKERS: dict[str, dict[str, Any]] = {
    BREAKER: {
        "failure_threshold": 5,
        "failure_rate_threshold": 0.5,
        "window_type": "count",
        "window_size": 100,
        "minimum_requests": 10,
        "slow_call_seconds": 10.0,
        "slow_call_rate_threshold": 0.5,
        "recovery_timeout_seconds": 30.0,
        "half_open_max_calls": 2,
        "success_threshold": 2,
    }
}


def rate_limits(
    utilisation_rate: float = UTILISATION_RATE, utilisation_burst: int = UTILISATION_BURST
) -> dict[str, dict[str, Any]]:
    """The bench's named limits (``RELIABLE_RATE_LIMITS``)."""
    return {
        LIMIT: {"kind": "gcra", "rate": LIMIT_RATE, "burst": LIMIT_BURST, "per": "global"},
        UTILISATION_LIMIT: {
            "kind": "gcra",
            "rate": utilisation_rate,
            "burst": utilisation_burst,
            "per": "global",
        },
    }


def worker_settings_env(
    utilisation_rate: float = UTILISATION_RATE, utilisation_burst: int = UTILISATION_BURST
) -> dict[str, str]:
    """The two settings variables, for a worker's environment."""
    return {
        "RELIABLE_BREAKERS": json.dumps(BREAKERS),
        "RELIABLE_RATE_LIMITS": json.dumps(rate_limits(utilisation_rate, utilisation_burst)),
    }


def admitted_key(prefix: str) -> str:
    """The list of start stamps (Redis time) of the utilisation task."""
    return f"{prefix}:bench:admitted"


# KEYS admitted list   ARGV now ('' = Redis TIME): one round trip, stamped on Redis time.
STAMP = scripts.compose(
    body="""
redis.call('RPUSH', KEYS[1], string.format('%.6f', now))
return 1
"""
)
