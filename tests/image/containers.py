"""Docker for the image tests: build the image, run containers on the host's network.

Every container a test starts is named after its test environment and removed when the
test ends (:class:`Containers`), whatever happened. No Docker network is ever created:
each container uses ``--network host`` and reaches Redis and the sandbox on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# What tests/image/prepare.sh makes (the same environment variables move both).
BASE = os.environ.get("RELIABLE_IMAGE_BASE", "reliable-base:bookworm")
CA_IMAGE = os.environ.get("RELIABLE_IMAGE_CA", "reliable-host-ca:local")
TAG = os.environ.get("RELIABLE_IMAGE_TAG", "reliable-worker:test")
# Docker's own health-check timing is in seconds; a test polls faster than the image does.
HEALTH_FLAGS = ("--health-interval", "1s", "--health-start-period", "60s", "--health-retries", "3")


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``docker <args>``; a failure raises with its output."""
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def docker_answers() -> bool:
    try:
        return docker("info", timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def image_id(name: str) -> str | None:
    done = docker("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def build_image() -> float:
    """Build the Dockerfile as :data:`TAG` on the local base when there is one (else the
    Dockerfile's default base); returns the seconds it took."""
    args = ["build", "--network", "host", "--tag", TAG]
    if image_exists(BASE):
        args += ["--build-arg", f"BASE={BASE}"]
    if image_exists(CA_IMAGE):
        args += ["--build-arg", f"CA_IMAGE={CA_IMAGE}"]
    previous = image_id(TAG)
    start = time.monotonic()
    docker(*args, str(ROOT), timeout=900)
    seconds = time.monotonic() - start
    if previous and previous != image_id(TAG):  # the last run's image, now untagged
        docker("rmi", previous, check=False)
    return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Containers:
    """The containers one test runs from the image; :meth:`remove_all` at its end."""

    def __init__(self, prefix: str, env: dict[str, str]) -> None:
        self.prefix = prefix
        self.env = env
        self.names: list[str] = []

    def run(
        self, role: str, command: Sequence[str] = (), *, health: bool = False, **env: str
    ) -> str:
        """Start ``command`` (the image's default: a worker) detached on the host's
        network, with the environment's settings; returns the container's name, which is
        also its hostname (so a worker's node name is ``celery@<name>``)."""
        name = f"{self.prefix}-{role}"
        self.names.append(name)
        flags = [*HEALTH_FLAGS] if health else ["--no-healthcheck"]
        variables = [f"--env={key}={value}" for key, value in {**self.env, **env}.items()]
        docker(
            "run", "--detach", "--name", name, "--hostname", name, "--network", "host",
            *flags, *variables, TAG, *command,
        )  # fmt: skip
        return name

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", name).stdout)[0])

    def health(self, name: str) -> str:
        return str(self.inspect(name)["State"].get("Health", {}).get("Status", "none"))

    def running(self, name: str) -> bool:
        return bool(self.inspect(name)["State"]["Running"])

    def logs(self, name: str) -> str:
        done = docker("logs", name, check=False)
        return done.stdout + done.stderr

    def stop(self, name: str, grace_seconds: int = 60) -> float:
        """``docker stop`` (SIGTERM, SIGKILL after the grace); returns the seconds it took."""
        start = time.monotonic()
        docker("stop", "-t", str(grace_seconds), name, timeout=grace_seconds + 30)
        return time.monotonic() - start

    def remove_all(self) -> None:
        if self.names:
            docker("rm", "--force", "--volumes", *self.names, check=False)
        self.names.clear()
