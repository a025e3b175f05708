"""Records when a prefork worker's parent notices that a pool child died.

Installed from ``bench/hook/sitecustomize.py`` when ``BENCH_CHILD_LOSS_FILE`` is set: wraps
``AsynPool.on_job_process_lost`` (called as soon as the parent has reaped the dead child
and found the job it was running) and appends ``<time> <pid>`` to the file. The revival
bench splits "kill -> task restarted" into Celery's detection delay and the rest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def install(path: str) -> None:
    from celery.concurrency import asynpool

    original = asynpool.AsynPool.on_job_process_lost

    def on_job_process_lost(self: Any, job: Any, pid: int, exitcode: int) -> Any:
        with open(path, "a") as f:
            f.write(f"{time.time()} {pid}\n")
        return original(self, job, pid, exitcode)

    asynpool.AsynPool.on_job_process_lost = on_job_process_lost


def noticed_at(path: Path, pid: int) -> float | None:
    """When the parent noticed the death of ``pid`` (None if it has not, or no file)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        t, p = line.split()
        if int(p) == pid:
            return float(t)
    return None
