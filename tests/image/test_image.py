"""The image, run: a worker, beat and the sandbox provider from it, on the host's network,
against the local Redis; a plain Celery producer sends the work.

Numbers (``-s``): how long ``docker stop`` of a busy worker took.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from tests.image.conftest import container_env, new_environment
from tests.image.containers import Containers, docker
from tests.support.fleet import Environment, delete_prefix, free_port, wait_until

CHARGES = 6
NON_ROOT_UID = "10001"


@dataclass
class Stack:
    env: Environment
    containers: Containers
    worker: str
    beat: str


def start_sandbox(containers: Containers, env: Environment) -> None:
    """The sandbox provider from the image, on the port the environment's URL names."""
    port = env.sandbox_url.rsplit(":", 1)[1]
    containers.run(
        "sandbox", ["python", "-m", "worker.sandbox", "--host", "127.0.0.1", "--port", port]
    )

    def answers() -> bool:
        try:
            return httpx.get(f"{env.sandbox_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, timeout=30, message="the sandbox provider in its container")


def charges(env: Environment) -> list[dict[str, Any]]:
    """Every charge call the sandbox recorded (duplicates included)."""
    reply = httpx.get(f"{env.sandbox_url}/effects", params={"endpoint": "charges"}, timeout=5)
    return list(reply.json()["effects"])


def send_charges(producer: Celery, ids: list[str]) -> list[AsyncResult]:
    return [
        producer.send_task(
            "payments.charge", kwargs={"payment_id": pid, "amount": 100, "currency": "EUR"}
        )
        for pid in ids
    ]


def charged_ids(env: Environment) -> list[str]:
    return sorted(str(call["body"]["payment_id"]) for call in charges(env))


@pytest.fixture(scope="module")
def stack(image: str, tcp_redis_url: str) -> Iterator[Stack]:
    """Sandbox, a worker (the image's default command and health check) and beat."""
    env = new_environment(tcp_redis_url)
    containers = Containers(f"reliable-{env.name}", container_env(env))
    try:
        start_sandbox(containers, env)
        worker = containers.run("worker", health=True)
        beat = containers.run("beat", ["celery", "-A", "worker.app", "beat", "-l", "INFO"])
        yield Stack(env, containers, worker, beat)
    finally:
        containers.remove_all()
        delete_prefix(tcp_redis_url, env.prefix)


def test_the_worker_container_does_the_work_a_plain_producer_sends(stack: Stack) -> None:
    ids = [f"img-{stack.env.name}-{n}" for n in range(CHARGES)]
    results = send_charges(stack.env.producer(), ids)
    replies = [result.get(timeout=90) for result in results]
    assert [reply["status"] for reply in replies] == ["charged"] * CHARGES
    assert charged_ids(stack.env) == sorted(ids)  # one call each, no duplicate


def test_the_worker_container_turns_healthy(stack: Stack) -> None:
    containers = stack.containers
    wait_until(
        lambda: containers.health(stack.worker) == "healthy",
        timeout=90,
        interval=0.5,
        message=f"{stack.worker} healthy (docker inspect)",
    )
    checks = containers.inspect(stack.worker)["State"]["Health"]["Log"]
    assert checks and checks[-1]["ExitCode"] == 0


def test_every_process_in_the_worker_container_runs_as_a_non_root_user(stack: Stack) -> None:
    assert stack.containers.inspect(stack.worker)["Config"]["User"] == f"{NON_ROOT_UID}:10001"
    wait_until(lambda: stack.containers.running(stack.worker), message="worker running")
    rows = docker("top", stack.worker, "-eo", "uid,pid,args").stdout.splitlines()[1:]
    uids = [row.split()[0] for row in rows]
    assert len(uids) >= 3, rows  # the main process and its two pool children
    assert set(uids) == {NON_ROOT_UID}, rows


def test_beat_from_the_image_takes_the_schedule_lock(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env.redis_url)
    lock = f"{stack.env.prefix}:redbeat::lock"
    wait_until(lambda: client.exists(lock), timeout=60, message=f"beat holds {lock}")
    assert stack.containers.running(stack.beat)


def test_docker_stop_is_a_warm_shutdown_that_loses_nothing(
    containers: Containers, image_env: Environment
) -> None:
    """SIGTERM while two charges are in flight (3 s each) and four wait in the queue: the
    two finish inside the grace, the container exits 0, and a second worker does the
    other four — six charges, each called once."""
    start_sandbox(containers, image_env)
    faults = {"latency_by_endpoint": {"charges": 3.0}}
    httpx.post(f"{image_env.sandbox_url}/faults", json=faults, timeout=5).raise_for_status()
    first = containers.run("worker-1")
    producer = image_env.producer()
    ids = [f"stop-{image_env.name}-{n}" for n in range(CHARGES)]
    results = send_charges(producer, ids)

    def in_flight() -> int:
        replies = producer.control.inspect(destination=[f"celery@{first}"], timeout=1).active()
        return len((replies or {}).get(f"celery@{first}", []))

    wait_until(lambda: in_flight() == 2, timeout=60, message="two charges running")
    seconds = containers.stop(first, grace_seconds=60)
    print(f"\ndocker stop of a worker with two 3 s charges in flight: {seconds:.1f} s")

    state = containers.inspect(first)["State"]
    assert state["ExitCode"] == 0, containers.logs(first)[-3000:]
    finished = [result for result in results if result.state == "SUCCESS"]
    assert len(finished) == 2  # the two in flight finished inside the grace
    assert len(charges(image_env)) == 2

    containers.run("worker-2")
    replies = [result.get(timeout=90) for result in results]
    assert [reply["status"] for reply in replies] == ["charged"] * CHARGES
    assert charged_ids(image_env) == sorted(ids)  # nothing lost, nothing twice


def test_the_ops_service_runs_from_the_image(stack: Stack) -> None:
    """``reliable ops`` in the image: ready against the stack's Redis, admin behind a token."""
    port = free_port()
    token = "image-test-admin-token-0123"
    stack.containers.run(
        "ops",
        ["reliable", "ops"],
        RELIABLE_OPS__PORT=str(port),
        RELIABLE_OPS__ADMIN_TOKENS=f'{{"ci": "{token}"}}',
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> int:
        try:
            return httpx.get(f"{url}/health/ready", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    assert wait_until(lambda: ready() == 200 and 200, 90, interval=0.5, message="ops ready")
    admin = f"{url}/admin/reliability/circuit-breakers"
    assert httpx.get(admin, timeout=10).status_code == 401
    breakers = httpx.get(admin, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert breakers.status_code == 200 and "payment" in breakers.text
