"""Shared fixtures: a real Redis (or an embedded one), isolated environments, sandbox.

Redis: ``REDIS_URL`` or 127.0.0.1:6379; when neither answers, an embedded Redis is
started so the suite runs anywhere — except in CI (``CI`` set), where a missing
service fails the run. The session stops the embedded Redis it started (and leaves one
it found running alone). RabbitMQ tests skip locally without RabbitMQ and fail in CI.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from reliability.store import Store
from tests.support.fleet import Environment, delete_prefix
from tests.support.needs import IN_CI, missing
from worker.sandbox import SandboxProvider

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
    except (redis.exceptions.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if _redis_answers(url):
        yield url
        return
    if IN_CI:
        missing(f"Redis does not answer at {url}")
    from worker import embedded

    data_dir = os.path.join(tempfile.gettempdir(), "reliable-test-redis")
    with embedded.serving(data_dir):
        yield embedded.embedded_url(data_dir)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    host, port = "127.0.0.1", 5672
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        missing("RabbitMQ does not answer on 127.0.0.1:5672")
    return RABBITMQ_URL


@pytest.fixture
def sandbox() -> Iterator[SandboxProvider]:
    with SandboxProvider().start() as provider:
        yield provider


@pytest.fixture
def environment(redis_url: str, sandbox: SandboxProvider) -> Iterator[Environment]:
    env = Environment(redis_url=redis_url, sandbox_url=sandbox.url)
    yield env
    delete_prefix(redis_url, env.prefix)


@pytest.fixture
def store(environment: Environment) -> Store:
    return Store(environment.redis_url, environment.prefix)


@pytest.fixture
def bare_store(redis_url: str) -> Iterator[Store]:
    """A store under a fresh prefix, for tests that need no worker or sandbox."""
    prefix = "u" + os.urandom(5).hex()
    yield Store(redis_url, prefix)
    delete_prefix(redis_url, prefix)


@pytest.fixture
def cli_env(redis_url: str) -> Iterator[Environment]:
    """A test environment (own prefix, cleaned) for ``reliable`` commands (tests/support/cli)."""
    env = Environment(redis_url=redis_url)
    yield env
    delete_prefix(redis_url, env.prefix)


@pytest.fixture
def second_store(bare_store: Store) -> Iterator[Store]:
    """Another connection to the same prefix, as another host or process would have."""
    other = Store(bare_store.url, bare_store.keys.prefix)
    yield other
    other.close()


# Module-scoped environment for test files that share one worker across their tests: the
# file defines a module-scoped ``worker(shared_env)`` fixture with its own settings.
@pytest.fixture(scope="module")
def shared_sandbox() -> Iterator[SandboxProvider]:
    with SandboxProvider().start() as provider:
        yield provider


@pytest.fixture(scope="module")
def shared_env(redis_url: str, shared_sandbox: SandboxProvider) -> Iterator[Environment]:
    env = Environment(redis_url=redis_url, sandbox_url=shared_sandbox.url)
    yield env
    delete_prefix(redis_url, env.prefix)


@pytest.fixture(scope="module")
def producer(shared_env: Environment) -> Celery:
    return shared_env.producer()


@pytest.fixture(scope="module")
def shared_store(shared_env: Environment) -> Store:
    return Store(shared_env.redis_url, shared_env.prefix)


@pytest.fixture
def provider(shared_sandbox: SandboxProvider, worker: Any) -> SandboxProvider:
    """The shared sandbox with no faults and no records left from an earlier test."""
    shared_sandbox.reset()
    return shared_sandbox
