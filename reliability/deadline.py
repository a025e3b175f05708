"""Deadlines: a message past its ``deadline`` header does not run.

The producer sets ``deadline`` as ISO-8601 UTC. The worker's parent process shortens
the soft time limit to the time left (see :mod:`reliability.request`), so even a body
that never checks the clock stops at the deadline; child tasks inherit what is left.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def parse_deadline(value: str | None) -> datetime | None:
    """The deadline as an aware UTC datetime; ``None`` when absent or unreadable.

    An unreadable deadline is treated as absent here; :func:`validate_deadline` is where
    the pipeline rejects it as poison with a clear reason.
    """
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def validate_deadline(value: str | None) -> str | None:
    """A reason string when a present deadline header cannot be parsed, else ``None``."""
    if value and parse_deadline(value) is None:
        return f"deadline header {value!r} is not ISO-8601"
    return None


def remaining_seconds(deadline: datetime | None, now: float | None = None) -> float | None:
    """Seconds left before the deadline (negative when past); ``None`` without one."""
    if deadline is None:
        return None
    return deadline.timestamp() - (time.time() if now is None else now)


def soft_limit(
    soft: float | None, deadline: datetime | None, now: float | None = None
) -> float | None:
    """``min(soft time limit, time left)``, never below a small positive floor."""
    left = remaining_seconds(deadline, now)
    if left is None:
        return soft
    left = max(left, 0.05)
    return left if soft is None else min(soft, left)


def format_deadline(deadline: datetime) -> str:
    return deadline.astimezone(UTC).isoformat().replace("+00:00", "Z")
