"""A body cannot starve its own lease: the worker's main process renews it.

A pool child that holds the GIL (a long C call) cannot run any thread of its own, so a
renewer beside the body would stall and the lease lapse while the body is alive — and
the reaper would hand the message to a second child, which would run it again. The
main process renews the leases of every child that is alive and not stopped.
"""

from __future__ import annotations

from reliability.idempotency import derive_key
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess
from worker.sandbox import SandboxProvider

LEASE_TTL = 2  # seconds; the body holds the GIL for 3x that


def test_a_body_holding_the_gil_for_three_lease_ttls_keeps_its_lease_and_runs_once(
    environment: Environment, sandbox: SandboxProvider, store: Store
) -> None:
    producer = environment.producer()
    with WorkerProcess(
        environment, concurrency=2, RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS=str(LEASE_TTL)
    ) as worker:
        result = producer.send_task(
            "test.hold_gil", kwargs={"key": "gil", "seconds": 3 * LEASE_TTL}
        )
        value = result.get(timeout=60)
        log = worker.log_text()
    key = derive_key("test.hold_gil", {"key": "gil"}, key_args=("key",))
    calls = [(c["idempotency_key"], c["fencing_token"], c["outcome"]) for c in sandbox.effects()]
    print("calls:", calls)
    # One run, under the first fence: the lease never lapsed, no second child started it.
    assert calls == [(key, 1, "effect")]
    assert value["status"] == "ok"
    state = store.call("read", lambda c: c.hgetall(store.keys.idem("test.hold_gil", key)))
    assert (state["state"], state["fence"]) == ("done", "1")
    assert "lease_lapsed" not in log and "idempotency_lease_lost" not in log
    assert log.count('"task_name": "test.hold_gil"') >= 1
