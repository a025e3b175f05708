"""Beat on celery-redbeat with real processes: two beat instances never double a job.

Two ``celery beat`` processes and one worker share a test prefix. Only the beat holding
redbeat's lock sends jobs; when it is killed the other takes over within the lock
timeout. Independently, a job sent twice for one slot does its work once (the job
ledger, ``reliability.jobs``, counts runs per slot).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Iterator

import pytest
from celery import Celery

from reliability.jobs import Jobs
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import BeatProcess, Environment, WorkerProcess, delete_prefix, wait_until

SETTINGS = {
    "RELIABLE_MAINTENANCE__DLQ_CLEANUP_SECONDS": "1",
    "RELIABLE_MAINTENANCE__BEAT_LOCK_TIMEOUT_SECONDS": "5",
}


@pytest.fixture
def env(redis_url: str) -> Iterator[Environment]:
    environment = Environment(redis_url=redis_url, extra=SETTINGS)
    yield environment
    delete_prefix(redis_url, environment.prefix)


def slots(jobs: Jobs) -> list[int]:
    return [run.slot for run in jobs.runs("dlq-cleanup", count=1000)]


def test_two_beats_send_each_slot_once_and_the_second_takes_over(env: Environment) -> None:
    jobs = Jobs(Store(env.redis_url, env.prefix))
    with WorkerProcess(env, concurrency=1, pool="solo"):
        first, second = BeatProcess(env, name="beat-a"), BeatProcess(env, name="beat-b")
        with first, second:
            wait_until(lambda: len(slots(jobs)) >= 4, 30, message="4 dlq-cleanup slots run")
            sending = [b for b in (first, second) if "Sending due task" in b.log_text()]
            assert len(sending) == 1, "only the beat holding the lock sends jobs"
            before = slots(jobs)
            sending[0].signal(signal.SIGKILL)
            other = second if sending[0] is first else first
            wait_until(
                lambda: "Sending due task" in other.log_text(), 30, message="the other beat sends"
            )
            wait_until(lambda: len(slots(jobs)) >= len(before) + 3, 30, message="3 more slots")
        ran = slots(jobs)
        assert len(ran) == len(set(ran)), f"a slot ran twice: {Counter(ran).most_common(3)}"
        assert all(run.status == "ok" for run in jobs.runs("dlq-cleanup", count=1000))


def test_a_job_sent_twice_for_one_slot_does_its_work_once(env: Environment) -> None:
    jobs = Jobs(Store(env.redis_url, env.prefix))
    producer: Celery = env.producer()
    with WorkerProcess(env, concurrency=2):
        sent = [
            producer.send_task("maintenance.dlq_cleanup", kwargs={"slot": 42}) for _ in range(3)
        ]
        replies = [result.get(timeout=30) for result in sent]
    assert sorted(r["ran"] for r in replies) == [False, False, True]
    assert [run.slot for run in jobs.runs("dlq-cleanup")] == [42]
    assert [r for r in replies if r["ran"]] == [
        {"ran": True, "slot": 42, "status": "ok", "purged": 0}
    ]
    shown = run_cli(env, "jobs", "--job", "dlq-cleanup", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [(r["job"], r["slot"], r["result"]) for r in json.loads(shown.stdout)] == [
        ("dlq-cleanup", 42, {"purged": 0})
    ]


def test_an_active_beat_polls_health_and_evaluates_degradation_at_once(env: Environment) -> None:
    """Not one interval (here an hour) after it starts: the dashboard and the degradation
    level have something to show within seconds. Once per slot, as every job."""
    env.extra["RELIABLE_MAINTENANCE__HEALTH_POLL_SECONDS"] = "3600"
    jobs = Jobs(Store(env.redis_url, env.prefix))
    with WorkerProcess(env, concurrency=1, pool="solo"), BeatProcess(env):

        def ran() -> dict[str, int] | None:
            counts = Counter(run.job for run in jobs.runs(count=100))
            wanted = ("health-poll", "degradation-evaluate")
            return dict(counts) if all(counts[job] for job in wanted) else None

        counts = wait_until(ran, 30, message="health-poll and degradation-evaluate ran")
    assert (counts["health-poll"], counts["degradation-evaluate"]) == (1, 1)
