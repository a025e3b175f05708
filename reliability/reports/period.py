"""A report's period: an hour or a day (or any span), and how its times are written."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

HOUR = "hour"
DAY = "day"
PERIODS = (HOUR, DAY)


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO-8601 UTC with milliseconds (``2026-01-31T12:00:00.000Z``): every
    time in a report is written so, never as a number."""
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Period:
    """``[start, end)`` in Unix seconds, named ``hour`` or ``day``."""

    name: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if not self.end > self.start:
            raise ValueError(f"a period must end after it starts: {self.start} .. {self.end}")

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def start_ms(self) -> int:
        return math.floor(self.start * 1000)

    @property
    def end_ms(self) -> int:
        return math.floor(self.end * 1000)

    def holds_ms(self, ms: int) -> bool:
        """Whether a stream entry written at ``ms`` (its id's time) falls in the period."""
        return self.start_ms <= ms < self.end_ms

    @classmethod
    def ending(cls, name: str, every: float, end: float) -> Period:
        """The period of ``every`` seconds that ends at ``end``."""
        return cls(name, end - every, end)

    @classmethod
    def previous(cls, name: str, every: float, now: float) -> Period:
        """The last complete period before ``now``, periods aligned on multiples of
        ``every`` (Unix time): at 10:20 the hourly report covers 09:00-10:00 UTC."""
        return cls.ending(name, every, math.floor(now / every) * every)

    @classmethod
    def of_slot(cls, name: str, every: float, slot: int) -> Period:
        """The period a job run for schedule ``slot`` (``floor(now / every)``) reports:
        the one that ended when the slot began."""
        return cls.ending(name, every, slot * every)
