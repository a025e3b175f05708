"""Fixtures of the image tests (``make test-image``): the image, built once per run, and
isolated environments whose containers reach the local Redis over the host's network.

Without a Docker daemon these tests skip locally and fail in CI (``CI`` set), as the
suite's other services do. ``make test`` does not collect them (``--ignore`` in
pyproject.toml): they build an image.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.image.containers import TAG, Containers, build_image, docker_answers, free_port
from tests.support.fleet import Environment, delete_prefix
from tests.support.needs import missing


@pytest.fixture(scope="session")
def image() -> str:
    """The Dockerfile built as :data:`TAG` (layers cached by Docker between runs)."""
    if not docker_answers():
        missing("no Docker daemon answers: run `make test-image` (it starts one)")
    seconds = build_image()
    print(f"\nimage {TAG} built in {seconds:.1f} s")
    return TAG


@pytest.fixture(scope="session")
def tcp_redis_url(redis_url: str) -> str:
    """Containers on the host's network reach Redis over TCP, not an embedded socket."""
    if not redis_url.startswith("redis://"):
        missing(f"the image tests need Redis on TCP (127.0.0.1:6379), not {redis_url}")
    return redis_url


def container_env(environment: Environment) -> dict[str, str]:
    """The environment's settings, as a container gets them: only ``RELIABLE_*``, the
    image's own task modules, production defaults (as the image ships)."""
    env = environment.env(RELIABLE_ENVIRONMENT="production")
    return {
        key: value
        for key, value in env.items()
        if key.startswith("RELIABLE_") and key != "RELIABLE_WORKER__TASK_MODULES"
    }


def new_environment(redis_url: str) -> Environment:
    return Environment(redis_url=redis_url, sandbox_url=f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def image_env(tcp_redis_url: str) -> Iterator[Environment]:
    environment = new_environment(tcp_redis_url)
    yield environment
    delete_prefix(tcp_redis_url, environment.prefix)


@pytest.fixture
def containers(image: str, image_env: Environment) -> Iterator[Containers]:
    running = Containers(f"reliable-{image_env.name}", container_env(image_env))
    yield running
    running.remove_all()
