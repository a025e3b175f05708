"""Flower against our workers: ``celery -A worker.app flower`` over a real prefork worker.

Flower's HTTP API lists the worker (inspect and control answer), shows each task's
state from the events the worker sends, and shows a secret argument only masked (the
worker recomputes the ``argsrepr``/``kwargsrepr`` of what it receives from the masked
arguments: :mod:`reliability.reprs`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from config import load_settings
from tests.support.fleet import Environment, FlowerProcess, WorkerProcess, wait_until
from worker.cli import service_programs

CONFIGURED_KEY = "sk_live_flowerconfigured_0123456789"
PAYLOAD_KEY = "ak_payload_FLOWER_9c1d"


@pytest.fixture
def worker(environment: Environment) -> Iterator[WorkerProcess]:
    with WorkerProcess(
        environment, concurrency=2, RELIABLE_PROVIDERS__PAYMENT_API_KEY=CONFIGURED_KEY
    ) as process:
        yield process


@pytest.fixture
def flower(environment: Environment, worker: WorkerProcess) -> Iterator[FlowerProcess]:
    with FlowerProcess(environment) as process:
        yield process


def test_flower_lists_the_worker_and_task_states_with_secrets_masked(
    environment: Environment, worker: WorkerProcess, flower: FlowerProcess
) -> None:
    producer = environment.producer()
    warmup = producer.send_task("test.echo", args=["warmup"])
    warmup.get(timeout=30)
    wait_until(lambda: warmup.id in flower.tasks(), 30, message="flower sees events")

    ok = producer.send_task(
        "test.keyed_echo", args=[{"api_key": PAYLOAD_KEY, "note": f"token {CONFIGURED_KEY}"}]
    )
    # Fails with the configured key in its message, dead-lettered after its retries.
    failing = producer.send_task("test.leak_secret", kwargs={"note": f"key={CONFIGURED_KEY}"})
    ok.get(timeout=30)

    def states() -> dict[str, Any] | None:
        tasks = flower.tasks()
        done = {ok.id: "SUCCESS", failing.id: "FAILURE"}
        if all(tasks.get(i, {}).get("state") == s for i, s in done.items()):
            return tasks
        return None

    tasks = wait_until(states, 60, message="flower shows the success and the failure")
    assert tasks[ok.id]["name"] == "test.keyed_echo"
    assert tasks[failing.id]["name"] == "test.leak_secret"
    assert "***" in tasks[ok.id]["args"] and "***" in tasks[failing.id]["kwargs"]
    info = flower.api(f"/api/task/info/{ok.id}")
    text = json.dumps(tasks) + json.dumps(info)
    assert CONFIGURED_KEY not in text and PAYLOAD_KEY not in text

    workers = flower.api("/api/workers?refresh=1")
    names = [name for name in workers if name.startswith(f"{worker.name}@")]
    assert len(names) == 1, list(workers)
    found = workers[names[0]]
    assert environment.queue in [q["name"] for q in found["active_queues"]]
    assert "test.keyed_echo" in found["registered"]
    assert found["stats"]["pool"]["max-concurrency"] == 2


def test_reliable_run_starts_flower_only_when_asked() -> None:
    settings = load_settings(
        environment="development", metrics={"flower_port": 5601, "flower_host": "127.0.0.1"}
    )
    without = service_programs(settings, 1, with_beat=True, with_sandbox=False, with_ops=True)
    assert "flower" not in [p.name for p in without]
    programs = service_programs(
        settings, 1, with_beat=True, with_sandbox=False, with_ops=True, with_flower=True
    )
    flower = next(p for p in programs if p.name == "flower")
    assert flower.argv[-4:] == ["worker.app", "flower", "--port=5601", "--address=127.0.0.1"]
    assert flower.stops_last
