"""Whether a process runs, by pid (for sweeps of what dead processes left behind)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited or killed, not yet reaped) is dead.

    Reads ``/proc/<pid>/stat`` where there is one, else asks the kernel with signal 0
    (which counts a zombie as alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True
