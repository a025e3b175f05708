"""A whole worker that dies has its in-flight tasks run again within seconds.

Its main process beats about every second (``P:hb:<worker>``, TTL a few seconds). When
the worker is SIGKILLed — main process and pool children at once, a lost host — the
beat stops, and the maintenance leader (the surviving worker) releases the dead
worker's idempotency leases and hands its unacked messages back: the tasks run again
long before their 60 s lease TTL would have let them.
"""

from __future__ import annotations

import time

from reliability.idempotency import derive_key
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider

SLOW_CALL = "test.slow_call"
LEASE_TTL = "60"


def fence(store: Store, key: str) -> int:
    redis_key = store.keys.idem(SLOW_CALL, derive_key(SLOW_CALL, {"key": key}, key_args=("key",)))
    return int(store.call("read", lambda c: c.hget(redis_key, "fence")) or 0)


def test_the_in_flight_tasks_of_a_killed_worker_run_again_long_before_their_lease_ttl(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    producer = environment.producer()
    survivor = WorkerProcess(
        environment,
        concurrency=2,
        name="survivor",
        RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS=LEASE_TTL,
    ).start()
    victim = WorkerProcess(
        environment, concurrency=2, name="victim", RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS=LEASE_TTL
    ).start()
    keys = [f"k{i}" for i in range(4)]
    try:
        results = [producer.send_task(SLOW_CALL, kwargs={"key": k, "before": 3.0}) for k in keys]
        # Both workers run two each (prefetch 1 per process: four places for four tasks).
        wait_until(
            lambda: store.call("n", lambda c: c.zcard(store.keys.leases)) == 4,
            timeout=30,
            message="four tasks running",
        )
        owners = {k: owner(store, k) for k in keys}
        victim.kill()
        killed_at = time.monotonic()
        revived_keys = [k for k, o in owners.items() if o.startswith(f"{identity(victim)}:")]
        assert len(revived_keys) == 2, owners
        # The victim's tasks start again (a new fence) long before the 60 s lease TTL.
        wait_until(
            lambda: all(fence(store, k) == 2 for k in revived_keys),
            timeout=15,
            interval=0.05,
            message="the dead worker's tasks running again",
        )
        revival = time.monotonic() - killed_at
        values = [r.get(timeout=30) for r in results]
        log = survivor.log_text()
    finally:
        victim.stop()
        survivor.stop()
    print(
        f"whole worker SIGKILLed -> its 2 in-flight tasks running again after "
        f"{revival:.2f}s (lease TTL {LEASE_TTL} s)"
    )
    assert [v["status"] for v in values] == ["ok"] * 4
    rec = Ledger(store).reconcile([r.id for r in results])
    assert rec.lost == 0 and rec.count("succeeded") == 4
    # The killed bodies never reached their call (3 s sleep first): one effect per key.
    assert sorted(e["idempotency_key"] for e in sandbox.effects()) == sorted(
        derive_key(SLOW_CALL, {"key": k}, key_args=("key",)) for k in keys
    )
    assert '"event": "worker_dead_revived"' in log


def identity(worker: WorkerProcess) -> str:
    """The worker's identity in the fleet: its host and main process id."""
    import socket

    return f"{socket.gethostname()}:{worker.pid}"


def owner(store: Store, key: str) -> str:
    redis_key = store.keys.idem(SLOW_CALL, derive_key(SLOW_CALL, {"key": key}, key_args=("key",)))
    return str(store.call("owner", lambda c: c.hget(redis_key, "owner")) or "")
