"""One call through a fleet-wide breaker, as a ``with`` / ``async with`` block."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reliability.breaker.circuit import CircuitBreaker


class BreakerCall:
    """One call through a breaker, as a context manager for ``with`` and ``async with``.

    Entry admits (a fresh owner token, so a half-open trial slot is this call's); exit
    records the block's outcome and duration. The Redis round trips are short blocking
    calls, in async code too (there is no asyncio Redis client in the library).
    """

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.owner = f"call:{uuid.uuid4().hex}"
        self.started = 0.0

    def __enter__(self) -> BreakerCall:
        self.breaker.admit(self.owner)
        self.started = time.monotonic()
        return self

    def __exit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        self.breaker.record(self.owner, error, time.monotonic() - self.started)

    async def __aenter__(self) -> BreakerCall:
        return self.__enter__()

    async def __aexit__(self, _type: object, error: BaseException | None, _tb: object) -> None:
        self.__exit__(_type, error, _tb)
