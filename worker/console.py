"""What every ``reliable`` operator command shares.

* Errors are one line on stderr and a non-zero exit, never a traceback: bad arguments
  exit 2 (:class:`OneLineParser`, the number types below, :class:`UsageError`),
  everything else 1 (:func:`operate`).
* A closed stdout (``reliable dlq list | head -1``) ends the command quietly, with the
  status of a program killed by SIGPIPE (141), as ``head``'s other writers do.
* Times are ISO-8601 UTC (:func:`iso`).
* Log lines go to stderr, warnings and above only (masked, as everywhere).
* With no Redis URL configured a command uses the running embedded Redis, or starts one
  for the command and stops it afterwards (:func:`operate`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import redis
from kombu.exceptions import OperationalError

from reliability.errors import BackendUnavailable, ReliabilityError
from reliability.logs import configure_logging
from worker.embedded import EmbeddedRedisError

# What a command exits with: 1 for an error, 2 for bad arguments (as argparse does).
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
CLI_LOG_LEVEL = "WARNING"


class CommandError(Exception):
    """An operator-facing failure: printed as one line, exit 1."""


class UsageError(CommandError):
    """Arguments argparse accepted but the command cannot use: one line, exit 2."""


def _number(kind: type[int] | type[float], text: str, minimum: float, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
    if value < minimum or value != value:  # NaN compares false
        raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count, a limit)."""
    return int(_number(int, text, 1, "a whole number of at least 1"))


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0 (an offset)."""
    return int(_number(int, text, 0, "a whole number of at least 0"))


def positive_float(text: str) -> float:
    """An argparse type: a number above 0 (a rate, seconds, minutes)."""
    value = _number(float, text, 0, "a number above 0")
    if value <= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a number above 0 expected, got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (``prog: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def fail(prog: str, message: str) -> int:
    """Print ``message`` as one line on stderr; returns :data:`EXIT_ERROR`."""
    one_line = " ".join(str(message).split())
    print(f"{prog}: error: {one_line}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def iso(timestamp: float | str | None) -> str:
    """A Unix time as ISO-8601 UTC with milliseconds (``2026-01-31T12:00:00.000Z``)."""
    if timestamp in (None, "", 0):
        return "-"
    moment = datetime.fromtimestamp(float(timestamp), UTC)  # type: ignore[arg-type]
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _masked(masker: Any, exc: BaseException) -> str:
    return masker.text(str(exc)) if masker is not None else str(exc)


def operate(prog: str, action: Callable[[Any], int]) -> int:
    """Run ``action(worker.app module)`` against the configured (or embedded) Redis.

    Known failures become one line on stderr: :class:`CommandError`, the library's own
    errors (an unknown name, a refused redrive, ...), an unreachable Redis (message
    masked: a URL's password never reaches the terminal), Ctrl-C.
    """
    masker: Any = None
    try:
        from worker import app as service
        from worker.celeryconfig import embedded_data_dir
        from worker.embedded import serving

        masker = service.runtime.masker
        # The command prints its own results; the library's log lines (masked, on stderr)
        # only when something is wrong.
        configure_logging(CLI_LOG_LEVEL, service.settings.log.json_output, masker)
        with serving(embedded_data_dir(service.settings)):
            code = action(service)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return code
    except BrokenPipeError:
        return _stdout_closed()
    except UsageError as exc:
        fail(prog, str(exc))
        return EXIT_USAGE
    except CommandError as exc:
        return fail(prog, str(exc))
    except (BackendUnavailable, redis.exceptions.RedisError, ConnectionError) as exc:
        return fail(prog, f"cannot reach Redis: {_masked(masker, exc)}")
    except OperationalError as exc:  # kombu: publishing (dlq retry) to the broker
        return fail(prog, f"cannot reach the broker: {_masked(masker, exc)}")
    except (ReliabilityError, EmbeddedRedisError) as exc:
        return fail(prog, str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def _stdout_closed() -> int:
    """The reader of stdout went away: say nothing (stderr is not the problem, but there
    is nothing to tell), and point stdout at /dev/null so the interpreter's last flush
    does not fail again."""
    with contextlib.suppress(OSError, ValueError):  # stdout may be gone or not a file
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE
