"""Prometheus multiprocess mode, prepared before ``prometheus_client`` is imported.

prometheus-client picks its value class once, when it is imported: with
``PROMETHEUS_MULTIPROC_DIR`` set every process (the worker's main process and each pool
child it forks) writes its samples to memory-mapped files in that directory, and the
process that serves ``/metrics`` sums them. So the directory must be set — and emptied
of a previous run's files, or old counts would be summed in — before any metric is
created (prometheus-client reads it at import; see :func:`prepare` for Celery's CLI,
which imports it earlier through Flower's command plugin). ``worker/__init__.py`` calls
:func:`prepare` first thing, which makes every entry point (``celery -A worker.app ...``,
``reliable ...``, ``python -m worker.ops``) do it. This module imports nothing from
``reliability`` (whose package imports prometheus-client).

Each main process gets its own directory ``<base>/<pid>`` (its forked children share
it); directories of processes that are gone are removed at the next start. The base is
``RELIABLE_METRICS__MULTIPROC_DIR`` (read here from the environment directly: settings
load later), default ``<tmp>/reliable-metrics-<uid>``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"
BASE_ENV = "RELIABLE_METRICS__MULTIPROC_DIR"


def default_base() -> str:
    return os.path.join(tempfile.gettempdir(), f"reliable-metrics-{os.getuid()}")


def _alive(pid: int) -> bool:
    # reliability.processes.process_alive, which this module may not import (see above).
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# sysexits.h EX_CONFIG: a broken setting; a supervisor (``reliable run``) does not restart on
# it. Here because this module runs first and imports nothing of the project.
EX_CONFIG = 78


def prepare(pid: int | None = None) -> str | None:
    """Set and wipe this process's multiprocess directory; its path (None when this
    service's metric families exist already: this process then stays single-process)."""
    if "reliability.metrics" in sys.modules:
        return None
    imported = "prometheus_client" in sys.modules
    pid = os.getpid() if pid is None else pid
    base = os.environ.get(BASE_ENV) or default_base()
    path = os.path.join(base, str(pid))
    try:
        os.makedirs(base, exist_ok=True)
        for name in os.listdir(base):
            if name.isdigit() and int(name) != pid and not _alive(int(name)):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    except OSError as exc:
        # A broken setting refuses to start in one line, as every other one does (exit 78,
        # EX_CONFIG: `reliable run` does not restart on it).
        reason = exc.strerror or type(exc).__name__
        print(
            f"invalid configuration:\n  {BASE_ENV}: cannot use {base!r} ({reason})", file=sys.stderr
        )
        raise SystemExit(EX_CONFIG) from None
    os.environ[ENV] = path
    if imported:
        # Celery's CLI loads its command plugins before the -A module, and Flower's
        # imports prometheus-client (for Flower's own metrics): its value class was
        # chosen without the directory. Metrics pick the class when they are created,
        # and ours are not created yet, so choosing it again is enough (Flower's stay
        # in memory, in Flower's registry).
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    return path
