"""``reliable ...`` as a user runs it: a subprocess with a test environment's settings."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from tests.support.fleet import ROOT, Environment


def reliable(
    env: Environment | Mapping[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``reliable <args>``; its exit status and output (never raises on a failure)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=ROOT,
        env=env.env() if isinstance(env, Environment) else dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
