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


def get_circuit_breaker(
    name: str, config: BreakerConfig | None = None, *, store: Store | None = None
) -> CircuitBreaker:
    """The breaker ``name`` (seed 003): ``cb = get_circuit_breaker("my_service", config)``.

    Without ``store`` it comes from the worker's runtime registry (settings and the
    built-in defaults), so it is the same object the tasks' breaker uses; a ``config`` for
    a new name registers it there, and one that differs from the defined policy is a
    :class:`~reliability.errors.ConfigurationError`. With ``store`` a breaker over that
    store is built from ``config`` or the built-in default for ``name``. An unknown name
    without a config raises :class:`KeyError`.
    """
    if store is None:
        from reliability.runtime import get_runtime

        registry = get_runtime().breakers
        return registry.get(name) if config is None else registry.register(name, config)
    if config is None:
        config = SERVICE_DEFAULTS.get(name)
        if config is None:
            raise KeyError(
                f"no circuit breaker named {name!r} among the built-in defaults"
                f" {sorted(SERVICE_DEFAULTS)}; pass a BreakerConfig"
            )
    return CircuitBreaker(name, store, config)
