"""How soon the in-flight tasks of a whole worker that died run again (issue 6, item 6).

A survivor worker (prefork ``-c 2``) runs for the whole bench. Each round starts a
victim worker (prefork ``-c 1``), hands it one keyed task that sleeps on its first
delivery only (``bench.reliable_sleep``, see ``bench/marks.py``), SIGKILLs the victim's
whole process group (main process and pool child: a lost host) and records when the
task starts again on the survivor. Bare Celery would wait for the Redis visibility
timeout (an hour by default); the lease TTL is set to 60 s so a revival before it can
only come from the heartbeat.

To make the victim take the task, the survivor stops consuming while it is sent
(``control.cancel_consumer``) and resumes right after (``add_consumer``), before the kill.

    .venv/bin/python -m bench.revival            # 20 kills (about 3 minutes)
    .venv/bin/python -m bench.revival --kills 5  # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import uuid
from pathlib import Path

import redis

from bench import guard_settings, marks
from tests.support.fleet import Environment, WorkerProcess, delete_prefix, task_modules, wait_until

TASK = "bench.reliable_sleep"
LEASE_TTL_SECONDS = 60


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run(kills: int, redis_url: str) -> dict[str, object]:
    environment = Environment(redis_url=redis_url)
    settings = {
        **guard_settings.worker_settings_env(),
        "RELIABLE_WORKER__TASK_MODULES": task_modules("bench.reliable_tasks"),
        "RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS": str(LEASE_TTL_SECONDS),
        "RELIABLE_LOG__LEVEL": "INFO",
    }
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    producer = environment.producer()
    survivor = WorkerProcess(environment, concurrency=2, name="survivor", **settings).start()
    node = f"survivor@{socket.gethostname()}"
    revivals: list[float] = []
    try:
        # Let the survivor lead and watch the store past its grace period first.
        time.sleep(6)
        for round_ in range(kills):
            victim = WorkerProcess(
                environment, concurrency=1, name=f"victim{round_}", **settings
            ).start()
            key = f"rev-{round_}-{uuid.uuid4().hex[:8]}"
            producer.control.cancel_consumer(environment.queue, destination=[node], reply=True)
            producer.send_task(TASK, args=[key, 120])
            started = wait_until(
                lambda key=key: marks.read(client, environment.prefix, key),
                timeout=30,
                interval=0.005,
                message="victim took the task",
            )
            producer.control.add_consumer(environment.queue, destination=[node], reply=True)
            killed_pid = int(started[0]["pid"])
            assert killed_pid in {c.pid for c in victim.children()}, "survivor took the task"
            victim.kill()
            killed_at = time.time()

            def restarted(key: str = key, pid: int = killed_pid) -> list[dict[str, object]]:
                return [
                    m
                    for m in marks.read(client, environment.prefix, key)
                    if m["event"] == "start" and m["pid"] != pid
                ]

            again = wait_until(
                restarted,
                timeout=LEASE_TTL_SECONDS,
                interval=0.01,
                message="task running again on the survivor",
            )
            revivals.append(float(again[0]["t"]) - killed_at)  # type: ignore[arg-type]
            print(
                f"kill {round_ + 1}/{kills}: running again after {revivals[-1]:.2f} s", flush=True
            )
            victim.stop()
    finally:
        survivor.stop()
        client.close()
        delete_prefix(redis_url, environment.prefix)
    return {
        "kills": len(revivals),
        "lease_ttl_seconds": LEASE_TTL_SECONDS,
        "heartbeat": "1 s interval, 4 s TTL (defaults)",
        "p50_seconds": round(statistics.median(revivals), 2),
        "p99_seconds": round(percentile(revivals, 0.99), 2),
        "max_seconds": round(max(revivals), 2),
        "all_seconds": [round(r, 2) for r in revivals],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    result = run(args.kills, args.redis_url)
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"revival-{int(time.time())}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
