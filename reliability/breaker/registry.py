"""Named breakers, from settings and in code (seed 003's ``get_circuit_breaker``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from reliability.breaker.circuit import CircuitBreaker
from reliability.breaker.config import SERVICE_DEFAULTS, BreakerConfig
from reliability.errors import ConfigurationError
from reliability.store import Store


class BreakerRegistry:
    """Named breakers built from settings; unknown names fail loudly."""

    def __init__(
        self,
        store: Store,
        configs: dict[str, BreakerConfig] | None = None,
        *,
        cache: Callable[[], Any] | None = None,
        local_fallback: bool = False,
    ) -> None:
        self.store = store
        self.configs = dict(SERVICE_DEFAULTS)
        self.configs.update(configs or {})
        self.cache = cache
        self.local_fallback = local_fallback
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        found = self._breakers.get(name)
        if found is None:
            if name not in self.configs:
                raise KeyError(f"no circuit breaker named {name!r}; known: {sorted(self.configs)}")
            found = self._breakers[name] = CircuitBreaker(
                name,
                self.store,
                self.configs[name],
                local_fallback=self.local_fallback,
                cache=self.cache,
            )
        return found

    def register(self, name: str, config: BreakerConfig) -> CircuitBreaker:
        """Define a breaker in code and return it; the same definition again is a no-op.

        A name already defined with another config is refused: every process must judge
        one shared breaker by the same policy.
        """
        known = self.configs.get(name)
        if known is not None and known != config:
            raise ConfigurationError(
                f"circuit breaker {name!r} is already defined with {known}; call"
                " get_circuit_breaker without a config to use it"
            )
        self.configs[name] = config
        return self.get(name)

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return (self.get(name) for name in sorted(self.configs))
