"""docker-compose.yml: valid for Debian's ``docker-compose``, host networking only, every
command it runs exists in the image, and scaled workers are told apart.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.image.conftest import container_env
from tests.image.containers import ROOT, TAG, docker
from tests.support.fleet import Environment, wait_until
from tests.support.needs import missing

COMPOSE_FILE = ROOT / "docker-compose.yml"
PROFILES = ("metrics",)  # every optional service too


def compose(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """``docker-compose <args>`` on the repository's file, the image under test as
    ``RELIABLE_IMAGE``; a failure raises with its output."""
    if shutil.which("docker-compose") is None:
        missing("docker-compose is missing (apt-get install docker-compose)")
    variables = {**os.environ, "RELIABLE_IMAGE": TAG, **(env or {})}
    done = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE_FILE), *args],
        capture_output=True, text=True, env=variables, timeout=timeout, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def services() -> dict[str, dict[str, Any]]:
    """The services as ``docker-compose config`` resolves them (``$$`` is a literal ``$``)."""
    args = [arg for profile in PROFILES for arg in ("--profile", profile)]
    config = yaml.safe_load(compose(*args, "config").replace("$$", "$"))
    assert "networks" not in config, "a Docker network takes a private address range"
    return dict(config["services"])


def test_the_compose_file_is_valid_and_every_service_uses_the_host_network() -> None:
    found = services()
    assert {"redis", "worker", "beat", "ops", "flower", "sandbox"} <= set(found)
    for name, service in found.items():
        assert service.get("network_mode") == "host", name
        assert "networks" not in service and "ports" not in service, name
    assert found["worker"]["restart"] == "unless-stopped"
    redis_args = found["redis"]["command"]
    for flag, value in (("--appendonly", "yes"), ("--maxmemory-policy", "noeviction")):
        assert redis_args[redis_args.index(flag) + 1] == value
    assert any(":/data" in volume for volume in found["redis"]["volumes"])


def help_argv(command: list[str]) -> list[str]:
    """The service's command asking for its help: the same program, subcommand and
    options, so it fails when any of them is unknown to the image."""
    if command[:2] == ["sh", "-c"]:
        return ["sh", "-c", f"{command[2]} --help"]
    return [*command, "--help"]


def test_every_compose_service_command_exists_in_the_image(image: str) -> None:
    """Each service run from the image starts its command with ``--help`` appended, in the
    service's own environment; each health check's program is on the image's PATH."""
    ours = {name: svc for name, svc in services().items() if svc.get("image") == TAG}
    assert {"worker", "beat", "flower", "sandbox"} <= set(ours)
    for name, service in ours.items():
        variables = [f"--env={k}={v}" for k, v in service.get("environment", {}).items()]
        argv = help_argv(list(service["command"]))
        done = docker(
            "run", "--rm", "--network", "host", "--no-healthcheck", *variables, image, *argv,
            check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"{name}: {argv}\n{done.stdout}\n{done.stderr}"
        assert "usage" in (done.stdout + done.stderr).lower(), f"{name}: {done.stdout}"
        test = service.get("healthcheck", {}).get("test", ["NONE"])
        if test[0] in ("CMD", "CMD-SHELL"):
            program = test[1] if test[0] == "CMD" else shlex.split(test[1])[0]
            found = docker("run", "--rm", "--no-healthcheck", image, "sh", "-c",
                           f"command -v {shlex.quote(program)}", check=False)  # fmt: skip
            assert found.returncode == 0, f"{name}: health check program {program} missing"


@pytest.fixture
def project(
    image: str, image_env: Environment, tmp_path: Path
) -> Iterator[tuple[list[str], Environment]]:
    """A compose project of its own (its name is the environment's), settings of the test
    environment through an override file, health checks every second; ``down`` at the end."""
    settings = container_env(image_env)
    override = {
        "services": {
            "worker": {
                "environment": settings,
                "healthcheck": {"interval": "1s", "start_period": "60s"},
            }
        }
    }
    path = tmp_path / "override.yml"
    path.write_text(yaml.safe_dump(override))
    args = ["-p", image_env.name, "-f", str(path)]
    yield args, image_env
    compose(*args, "down", "--volumes", "--timeout", "60")


def test_scaled_compose_workers_have_their_own_identity_and_turn_healthy(
    project: tuple[list[str], Environment],
) -> None:
    """Under host networking every replica has the host's hostname: the worker service's
    command gives each its own Celery node name and heartbeat identity."""
    args, env = project
    networks = docker("network", "ls", "-q").stdout.split()
    compose(*args, "up", "-d", "--no-deps", "--no-build", "--scale", "worker=2", "worker")
    names = [f"{env.name}_worker_{n}" for n in (1, 2)]
    for name in names:
        wait_until(
            lambda name=name: (
                docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout == "healthy\n"
            ),
            timeout=90,
            interval=0.5,
            message=f"{name} healthy",
        )
    client = redis.Redis.from_url(env.redis_url, decode_responses=True)
    identities = client.hkeys(f"{env.prefix}:workers")
    assert len(identities) == 2 and len(set(identities)) == 2, identities
    producer = env.producer()

    def nodes_answering() -> list[str]:
        # Healthy (the liveness file) can come before the consumer answers control.
        replies = producer.control.ping(timeout=1)
        return sorted(node for reply in replies for node in reply)

    nodes = wait_until(lambda: len(nodes_answering()) == 2 and nodes_answering(), 30)
    assert len(set(nodes)) == 2, nodes
    assert all(node.startswith("worker-") for node in nodes), nodes
    assert docker("network", "ls", "-q").stdout.split() == networks  # no network created
