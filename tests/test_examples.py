"""``examples/resilience_usage.py`` runs end to end as a user would run it (a subprocess).

Against the test Redis (``REDIS_URL``), it must exit 0, print what each seed API call did,
log ``idempotency_lock_acquired`` and leave no key behind; without ``REDIS_URL`` it starts
an embedded Redis of its own and stops it before exiting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import redis

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "resilience_usage.py"

EXPECTED_LINES = [
    "breaker: result = await cb.call(my_function) -> 'success'",
    "breaker: after 3 async failures state=open, failure_count=3",
    "breaker: 4th call refused without calling the API (open)",
    "breaker: after reset state=closed, failure_count=0",
    "breaker: a plain function returning a coroutine is refused (AwaitableReturned),"
    " not counted: failure_count=0",
    "idempotent: first call -> {'status': 'success', 'payment_id': 123}",
    "idempotent: second call -> {'payment_id': 123, 'status': 'success'} (stored result)",
    "idempotent: process_payment body ran 1 time(s)",
    "idempotent: duplicate with mark_duplicates -> {'skipped': True, 'reason': "
    "'idempotent_duplicate'}",
    "idempotent: check_idempotency('process_payment', 123, 50.0) -> True",
    "idempotent: clear_idempotency('process_payment', 123, 50.0) -> True",
    "idempotent: check_idempotency('process_payment', 123, 50.0) -> False",
    "idempotent: after clearing, the body ran again (2 runs)",
    "key: generate_idempotency_key('create_payment', 42, 100, 'EUR') -> "
    "21429298b3bdad2959ed4a744b948d3c7f4f378f26264373a47738d1c756cc47",
    "effect: wrap_order_placement -> executed=True, result={'order_id': '12345', "
    "'status': 'filled'}",
    "effect: wrap_order_placement -> executed=False, result={'order_id': '12345', "
    "'status': 'filled'}",
    "effect: async PAYMENT_CHARGE -> executed=True, result={'charged': 900}",
    "effect: async PAYMENT_CHARGE -> executed=False, result={'charged': 900}",
    "retry: async flaky() -> 'ok' after attempts=3",
    "task: check_idempotency('example.charge', 'pay-1', 500) -> False",
    "task: example.charge delivered twice, body ran 1 time(s)",
    "task: check_idempotency('example.charge', 'pay-1', 500) -> True",
]


def run_example(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_example_runs_every_seed_api_against_redis(redis_url: str) -> None:
    done = run_example(REDIS_URL=redis_url)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    missing = [line for line in EXPECTED_LINES if line not in lines]
    assert missing == [], done.stdout
    assert sum(line.startswith("breaker: async failure") for line in lines) == 3
    assert "idempotency_lock_acquired" in done.stderr
    prefix = lines[0].removeprefix("key prefix ")
    assert prefix.startswith("example-")
    assert lines[-1].startswith("deleted ") and lines[-1].endswith(f"keys under {prefix}")
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{prefix}*")) == []
    client.close()


def test_without_redis_url_the_example_stops_the_redis_it_started() -> None:
    done = run_example()
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    started = lines[0].removeprefix("started an embedded Redis at unix://")
    assert started != lines[0], lines[0]
    assert lines[-1] == "stopped the embedded Redis"
    data_dir = str(Path(started).parent)
    assert not Path(data_dir).exists()
    alive = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(data_dir in part for part in p.info["cmdline"] or ())
    ]
    assert alive == []
    assert "effect: async PAYMENT_CHARGE -> executed=False, result={'charged': 900}" in lines
