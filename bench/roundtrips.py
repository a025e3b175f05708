"""Counts Redis round trips in every process of a worker, and reads the counts back.

:func:`install` (called from ``bench/hook/sitecustomize.py`` when ``BENCH_ROUNDTRIP_DIR``
is set) wraps redis-py's ``AbstractConnection``, which every client in the process uses:
kombu's broker channels, Celery's result backend and the reliability store alike.

- one ``send_packed_command`` call is one round trip (a pipeline or a MULTI/EXEC block
  is sent once, so it counts once; a blocking ``BRPOP`` counts when it is sent);
- ``send_command`` / ``pack_commands`` name what was sent (``EVALSHA`` with the script's
  SHA prefix, pipelines as ``A+B+C``), so the bench can say where round trips come from;
- ``task_prerun`` / ``task_postrun`` times mark the measured window.

Every event is kept as ``(time, thread name, what)``; a pool child starts empty after
the fork. Each process writes ``<pid>.json`` at exit (``atexit`` in the main process,
``worker_process_shutdown`` in a pool child, which leaves through ``os._exit``).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Thread names whose Redis calls are on the task's path (consumer, pool child, events).
TASK_PATH_THREADS = frozenset({"MainThread"})
# Share of the tasks (by start time, the middle ones) whose round trips count per task.
STEADY_SHARE = 0.8
# A pipeline longer than this is named by its first commands only.
MAX_PIPELINE_NAMES = 6

_local = threading.local()
_state: dict[str, Any] = {"role": "main", "events": [], "starts": [], "ends": [], "dir": ""}


def _name(command: Any) -> str:
    return command.decode() if isinstance(command, bytes) else str(command)


def _describe(args: tuple[Any, ...]) -> str:
    name = _name(args[0]).upper() if args else "?"
    if name == "EVALSHA" and len(args) > 1:
        return f"EVALSHA {_name(args[1])[:8]}"
    return name


def _patch(record: Callable[[str], None]) -> Callable[[], None]:
    """Wrap redis-py's connection so ``record(kind)`` runs once per round trip (a pipeline
    counts once, named after its first commands); returns the function that unpatches."""
    from redis.connection import AbstractConnection

    local = threading.local()
    send_command = AbstractConnection.send_command
    pack_commands = AbstractConnection.pack_commands
    send_packed_command = AbstractConnection.send_packed_command

    def counting_send_command(self: Any, *args: Any, **kwargs: Any) -> Any:
        local.pending = _describe(args)
        return send_command(self, *args, **kwargs)

    def counting_pack_commands(self: Any, commands: Any) -> Any:
        commands = list(commands)
        names = [_describe(tuple(c)) for c in commands[:MAX_PIPELINE_NAMES]]
        if len(commands) > MAX_PIPELINE_NAMES:
            names.append(f"...{len(commands)}")
        local.pending = "+".join(names)
        return pack_commands(self, commands)

    def counting_send_packed_command(self: Any, command: Any, check_health: bool = True) -> Any:
        what = getattr(local, "pending", None) or "?"
        local.pending = None
        record(what)
        return send_packed_command(self, command, check_health)

    AbstractConnection.send_command = counting_send_command
    AbstractConnection.pack_commands = counting_pack_commands
    AbstractConnection.send_packed_command = counting_send_packed_command

    def unpatch() -> None:
        AbstractConnection.send_command = send_command
        AbstractConnection.pack_commands = pack_commands
        AbstractConnection.send_packed_command = send_packed_command

    return unpatch


def install(directory: str) -> None:
    """Patch redis-py and connect the task signals in this process (and its children)."""
    from celery import signals

    _state["dir"] = directory
    events: list[tuple[float, str, str]] = _state["events"]
    _patch(lambda what: events.append((time.time(), threading.current_thread().name, what)))
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.worker_process_shutdown.connect(_on_child_exit, weak=False)
    os.register_at_fork(after_in_child=_after_fork)
    atexit.register(dump)


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Count this thread's round trips, by kind, while the block runs (the bench process's
    own publishing: celery-once takes its locks there)."""
    counter: Counter[str] = Counter()
    me = threading.get_ident()

    def record(what: str) -> None:
        if threading.get_ident() == me:
            counter[what] += 1

    unpatch = _patch(record)
    try:
        yield counter
    finally:
        unpatch()


def _on_prerun(**_: Any) -> None:
    _state["starts"].append(time.time())


def _on_postrun(**_: Any) -> None:
    _state["ends"].append(time.time())


def _on_child_exit(**_: Any) -> None:
    dump()


def _after_fork() -> None:
    # Lists are cleared in place: the wrappers hold a reference to the events list.
    _state["role"] = "child"
    for key in ("events", "starts", "ends"):
        _state[key].clear()


def dump() -> None:
    directory = _state["dir"]
    if not directory:
        return
    path = Path(directory) / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({key: _state[key] for key in ("role", "events", "starts", "ends")}))
    tmp.replace(path)


# -- reading the dumps back (bench side) ---------------------------------------------------


@dataclass
class Counts:
    """Round trips of every worker process inside one measured window."""

    tasks: int
    first_start: float
    last_end: float
    task_path: Counter[str] = field(default_factory=Counter)
    background: Counter[str] = field(default_factory=Counter)
    processes: int = 0
    # Task-path round trips while the middle STEADY_SHARE of the tasks started: no
    # per-process one-offs (connection handshakes, script loads) at the start.
    steady: Counter[str] = field(default_factory=Counter)
    steady_tasks: int = 0

    @property
    def seconds(self) -> float:
        return self.last_end - self.first_start


def read(directory: Path) -> Counts:
    """Sum every process's dump; the window runs from the first task start to the last end."""
    dumps = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    starts = [t for d in dumps for t in d["starts"]]
    ends = [t for d in dumps for t in d["ends"]]
    if not starts or not ends:
        raise RuntimeError(f"no task ran in the measured worker (dumps in {directory})")
    counts = Counts(
        tasks=len(ends), first_start=min(starts), last_end=max(ends), processes=len(dumps)
    )
    ordered = sorted(starts)
    skip = int(len(ordered) * (1 - STEADY_SHARE) / 2)
    steady_from, steady_to = ordered[skip], ordered[len(ordered) - 1 - skip]
    counts.steady_tasks = len(ordered) - 1 - 2 * skip
    for d in dumps:
        for t, thread, what in d["events"]:
            if counts.first_start <= t <= counts.last_end:
                on_path = thread in TASK_PATH_THREADS
                (counts.task_path if on_path else counts.background)[what] += 1
                if on_path and steady_from <= t < steady_to:
                    counts.steady[what] += 1
    return counts


def script_names() -> dict[str, str]:
    """SHA-1 prefix -> a readable name for every Lua script the reliability package runs."""
    import hashlib
    import itertools

    from bench import guard_settings
    from reliability import (
        admission,
        breaker,
        deferral,
        idempotency,
        ledger,
        maintenance,
        ratelimit,
        reaper,
        scripts,
    )
    from reliability.breaker import guard as breaker_guard
    from reliability.deferral import DEFER
    from reliability.degradation import guard as degradation_guard
    from reliability.delivery import REDELIVERY

    sources: dict[str, str] = {}
    for module in (
        scripts,
        idempotency,
        maintenance,
        deferral,
        ledger,
        reaper,
        breaker,
        ratelimit,
        guard_settings,
    ):
        for attr, value in vars(module).items():
            if isinstance(value, str) and "redis.call" in value:
                sources[f"{module.__name__.rsplit('.', 1)[-1]}.{attr}"] = value
    # In the pipeline's order: delivery, defer, idempotency, degradation, breaker, limits.
    fragments = {
        "delivery": REDELIVERY,
        "defer": DEFER,
        "idempotency": idempotency.FRAGMENT,
        "degradation": degradation_guard.ADMISSION,
        "breaker": breaker_guard.ADMISSION,
        "limits": ratelimit.fragment(1),
        "limits x2": ratelimit.fragment(2),
    }
    for n in range(1, len(fragments) + 1):
        for combo in itertools.combinations(fragments, n):
            if "limits" in combo and "limits x2" in combo:
                continue
            script = admission.assemble(tuple(fragments[c] for c in combo))
            sources["admission(" + "+".join(combo) + ")"] = script
    sources.update(_limits_scripts())
    return {hashlib.sha1(src.encode()).hexdigest()[:8]: name for name, src in sources.items()}


def _limits_scripts() -> dict[str, str]:
    """The ``limits`` library's Redis scripts (the off-the-shelf stack), if installed."""
    try:
        from importlib import resources

        folder = resources.files("limits").joinpath("resources/redis/lua_scripts")
        return {
            f"limits.{f.name.removesuffix('.lua')}": f.read_text()
            for f in folder.iterdir()
            if f.name.endswith(".lua")
        }
    except (ImportError, OSError):
        return {}


def readable(what: str, names: dict[str, str]) -> str:
    """``EVALSHA 1a2b3c4d`` -> ``EVALSHA admission(idempotency)`` where the script is known."""
    parts = []
    for part in what.split("+"):
        if part.startswith("EVALSHA "):
            sha = part.split(" ", 1)[1]
            part = f"EVALSHA {names.get(sha, sha)}"
        parts.append(part)
    return "+".join(parts)


def commands_of(round_trips: Counter[str]) -> Counter[str]:
    """The commands those round trips carried, by lower-case name (as commandstats names)."""
    out: Counter[str] = Counter()
    for what, n in round_trips.items():
        for part in what.split("+"):
            if part.startswith("..."):
                out["?"] += n * (int(part[3:]) - MAX_PIPELINE_NAMES)
            else:
                out[part.split(" ", 1)[0].lower()] += n
    return out
