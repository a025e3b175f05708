"""Every error the reliability library raises, rooted in :class:`ReliabilityError`.

Two families: *outcomes* a task author raises or a guard decides (transient, permanent,
conflict), and *control flow* the pipeline uses internally (deferral, dead-letter);
plus :class:`BackendUnavailable`, the one wrapper for state-store failures.
"""

from __future__ import annotations

import contextlib


class ReliabilityError(Exception):
    """Base class of everything raised by this library."""


class TransientError(ReliabilityError):
    """A failure worth retrying (5xx, timeout, throttling); may carry a retry-after hint."""

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(ReliabilityError):
    """A failure that retrying cannot fix (4xx, invalid data): goes to the DLQ at once."""


class IdempotencyConflict(PermanentError):
    """The same idempotency key arrived with different arguments."""


class PoisonMessage(PermanentError):
    """A message that can never run: invalid arguments, undecodable, redelivered too often."""


class StaleFencingToken(PermanentError):
    """A holder whose lease was taken over tried to act with an old fencing number."""


class DeadlineExceeded(PermanentError):
    """The message arrived after its ``deadline`` header."""


class BackendUnavailable(ReliabilityError):
    """The Redis state store could not be reached; nothing was decided or written."""


class ConfigurationError(ReliabilityError, TypeError):
    """A task declared an option no guard owns, or an invalid value for one."""


class RedriveRefused(ReliabilityError):
    """A DLQ entry was redriven as often as the policy allows (or no longer exists)."""


# Set on an exception whose delivery already has its outcome recorded (a DLQ entry).
_SETTLED = "_reliable_settled"


def settled(exc: BaseException) -> BaseException:
    """Mark an exception whose delivery already has its outcome recorded (DLQ entry)."""
    with contextlib.suppress(AttributeError):
        setattr(exc, _SETTLED, True)
    return exc


def is_settled(exc: BaseException) -> bool:
    return bool(getattr(exc, _SETTLED, False))
