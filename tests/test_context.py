"""Task context: correlation id, deadline and tenant travel with the work.

From the producer's headers to the provider (``X-Correlation-ID``), to every JSON log
line the task writes, to child tasks, and across retries; a deadline bounds the body.
One worker serves the module: each test uses its own keys and task ids.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, wait_until
from worker.sandbox import SandboxProvider


def unique(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def calls_for(provider: SandboxProvider, key: str) -> list[dict[str, Any]]:
    return [r for r in provider.effects() if r["body"] == {"key": key}]


def task_log_lines(worker: WorkerProcess, task_id: str) -> list[dict[str, Any]]:
    """The worker's JSON log lines bound to one task (lines that are not JSON are skipped)."""
    lines = []
    for text in worker.log_text().splitlines():
        if not text.startswith("{"):
            continue
        line = json.loads(text)
        if line.get("task_id") == task_id:
            lines.append(line)
    return lines


def logged_until(worker: WorkerProcess, task_id: str, event: str) -> list[dict[str, Any]]:
    """The task's log lines once a line starting with ``event`` is among them, else []."""
    lines = task_log_lines(worker, task_id)
    return lines if any(line["event"].startswith(event) for line in lines) else []


@pytest.fixture(scope="module")
def worker(shared_env: Environment) -> Iterator[WorkerProcess]:
    with WorkerProcess(shared_env) as process:
        yield process


def test_a_correlation_id_header_reaches_the_provider_the_log_lines_and_child_tasks(
    provider: SandboxProvider, producer: Celery, worker: WorkerProcess
) -> None:
    correlation_id, key = unique("corr"), unique("ctx")
    call = producer.send_task("test.call", args=[key], headers={"correlation_id": correlation_id})
    spawn = producer.send_task("test.spawn", args=["v"], headers={"correlation_id": correlation_id})

    assert call.get(timeout=30)["status"] == "ok"
    assert [c["correlation_id"] for c in calls_for(provider, key)] == [correlation_id]
    child = producer.AsyncResult(spawn.get(timeout=30)).get(timeout=30)
    assert child["correlation_id"] == correlation_id

    for name, task_id in (("test.call", call.id), ("test.spawn", spawn.id)):
        # Celery's own outcome line is bound too (the task's context lasts until postrun).
        finished = f"Task {name}[{task_id}] succeeded"
        lines = wait_until(
            lambda t=task_id, f=finished: logged_until(worker, t, f),
            10,
            message=f"the outcome line of task {task_id}",
        )
        assert {line["correlation_id"] for line in lines} == {correlation_id}


def test_a_missing_correlation_id_is_generated_once_and_kept_across_retries(
    provider: SandboxProvider, producer: Celery, worker: WorkerProcess, shared_store: Store
) -> None:
    provider.set_faults(script=[503, 503, 200])
    key = unique("gen")
    result = producer.send_task("test.call", args=[key])

    assert result.get(timeout=30)["status"] == "ok"
    assert Ledger(shared_store).outcomes([result.id])[result.id] == [
        "retried",
        "retried",
        "succeeded",
    ]
    seen = {c["correlation_id"] for c in calls_for(provider, key)}
    assert len(seen) == 1
    [generated] = seen
    assert generated
    lines = wait_until(lambda: task_log_lines(worker, result.id), 10, message="task log lines")
    assert {line["correlation_id"] for line in lines} == {generated}
    assert {line["attempt"] for line in lines} == {1, 2, 3}


def test_child_tasks_inherit_the_deadline_and_the_tenant(
    provider: SandboxProvider, producer: Celery
) -> None:
    deadline = iso(datetime.now(UTC) + timedelta(seconds=60))
    spawn = producer.send_task(
        "test.spawn", args=["v"], headers={"deadline": deadline, "tenant_id": "acme"}
    )

    child = producer.AsyncResult(spawn.get(timeout=30)).get(timeout=30)
    assert parse(child["deadline"]) == parse(deadline)
    assert child["tenant_id"] == "acme"
    assert child["correlation_id"]


def test_a_body_running_past_the_deadline_is_interrupted_then_dead_lettered_as_expired(
    provider: SandboxProvider, producer: Celery, shared_store: Store
) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=2)
    result = producer.send_task(
        "test.sleep", args=[unique("late"), 30], headers={"deadline": iso(deadline)}
    )

    with pytest.raises(Exception) as failure:  # the type is asserted by name
        result.get(timeout=20)
    assert type(failure.value).__name__ == "DeadlineExceeded"
    rows = [r for r in Ledger(shared_store).entries() if r["task_id"] == result.id]
    # The soft time limit (shortened to the deadline) stops the 30 s sleep at the deadline;
    # the retry then finds the deadline passed and does not run.
    assert [(r["outcome"], r["detail"]) for r in rows] == [
        ("retried", "SoftTimeLimitExceeded"),
        ("dead_lettered", "expired"),
    ]
    interrupted_at = float(rows[0]["at"])
    assert deadline.timestamp() - 0.1 <= interrupted_at < deadline.timestamp() + 1.5
    [entry] = [e for e in DeadLetterQueue(shared_store).iter() if e.task_id == result.id]
    assert (entry.failure_class, entry.attempts) == ("expired", 2)
    assert "passed" in entry.reason
