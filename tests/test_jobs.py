"""Maintenance jobs run once per schedule slot (reliability/jobs.py), against real Redis."""

from __future__ import annotations

import pytest

from reliability.jobs import Jobs, slot_of
from reliability.security import Masker
from reliability.store import Store


@pytest.fixture
def jobs(bare_store: Store) -> Jobs:
    return Jobs(bare_store, Masker(["hunter2-secret"]), history=100)


def test_slot_is_the_interval_the_moment_falls_in() -> None:
    assert slot_of(0.0, 60) == 0
    assert slot_of(59.999, 60) == 0
    assert slot_of(60.0, 60) == 1
    assert slot_of(1_000_000.5, 0.5) == 2_000_001


def test_a_slot_runs_its_work_once_however_often_it_is_sent(jobs: Jobs) -> None:
    calls: list[int] = []

    def work() -> dict[str, int]:
        calls.append(1)
        return {"purged": 3}

    first = jobs.run_once("cleanup", 60, work, now=6000.0)
    again = [jobs.run_once("cleanup", 60, work, now=6000.0 + i) for i in range(1, 59, 7)]
    assert first is not None and first.slot == 100 and first.status == "ok"
    assert first.result == {"purged": 3}
    assert again == [None] * len(again)
    assert len(calls) == 1
    # The next slot runs again; another job's same slot is its own.
    assert jobs.run_once("cleanup", 60, work, now=6060.0) is not None
    assert jobs.run_once("report", 60, work, now=6000.0) is not None
    assert len(calls) == 3
    assert [(r.job, r.slot) for r in jobs.runs()] == [
        ("report", 100),
        ("cleanup", 101),
        ("cleanup", 100),
    ]
    assert [r.slot for r in jobs.runs("cleanup")] == [101, 100]
    assert {name: run.slot for name, run in jobs.latest().items()} == {
        "cleanup": 101,
        "report": 100,
    }


def test_a_failing_job_is_recorded_masked_and_its_slot_not_run_again(jobs: Jobs) -> None:
    calls: list[int] = []

    def work() -> dict[str, int]:
        calls.append(1)
        raise RuntimeError("provider said no to hunter2-secret")

    run = jobs.run_once("health", 60, work, slot=7)
    assert run is not None and run.status == "failed"
    assert run.error == "RuntimeError: provider said no to ***"
    assert jobs.run_once("health", 60, work, slot=7) is None
    assert len(calls) == 1
    assert jobs.runs("health")[0].error == "RuntimeError: provider said no to ***"


def test_a_job_result_is_masked_in_the_ledger(jobs: Jobs) -> None:
    run = jobs.run_once(
        "report", 60, lambda: {"note": "token hunter2-secret", "password": "x"}, slot=1
    )
    assert run is not None
    stored = jobs.runs("report")[0].result
    assert stored == {"note": "token ***", "password": "***"}


def test_a_stored_run_that_does_not_parse_is_left_out_not_an_error(jobs: Jobs) -> None:
    """Written by hand or damaged: `reliable jobs` and the health endpoints still answer."""
    jobs.run_once("good-job", 60, lambda: {"n": 1}, now=120.0)
    store = jobs.store
    store.call("test", lambda c: c.hset(jobs.last, mapping={"bad": "not json", "odd": "[1]"}))
    store.call("test", lambda c: c.xadd(jobs.stream, {"run": "{"}))
    store.call("test", lambda c: c.xadd(jobs.stream, {"other": "x"}))
    assert list(jobs.latest()) == ["good-job"]
    assert [run.job for run in jobs.runs(count=10)] == ["good-job"]
