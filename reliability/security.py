"""Secrets never leave: masking for logs, DLQ entries, reports and API responses.

A :class:`Masker` knows every configured secret value and replaces it wherever it
appears in text or nested data; :func:`mask_secret` shortens one value for display
(seed 000). :func:`run_security_checks` warns about missing or weak secrets at start-up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

MASK = "***"
# Secrets shorter than this are not masked by value (too likely to hit innocent text);
# the settings validation refuses them in production instead.
MIN_SECRET_LENGTH = 4
# Keys whose values are masked whatever they contain.
SENSITIVE_KEY = re.compile(r"(pass(word)?|secret|token|api[_-]?key|authorization)", re.I)
# Anchored by a lookbehind on "://": tried only right after a scheme, so linear in the text.
_URL_CREDENTIALS = re.compile(r"(?<=://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def mask_secret(value: str, visible_chars: int = 4) -> str:
    """``"sk_live_1234567890abcdef"`` -> ``"***cdef"``; short values are fully masked."""
    if not value or len(value) <= visible_chars * 2:
        return MASK
    return MASK + value[-visible_chars:]


class Masker:
    """Replaces every configured secret value, and URL passwords, with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        plain = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        # Also as a JSON renderer writes them (escaped quotes, backslashes, non-ASCII):
        # log lines are masked after rendering.
        escaped = {json.dumps(s)[1:-1] for s in plain}
        values = sorted(plain | escaped, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def text(self, value: str) -> str:
        if self._pattern is not None:
            value = self._pattern.sub(MASK, value)
        return _URL_CREDENTIALS.sub(r"\g<user>:" + MASK + "@", value)

    def raw(self, value: bytes) -> bytes:
        """Bytes with secrets masked (undecodable message bodies kept in the DLQ)."""
        text = value.decode("utf-8", errors="surrogateescape")
        return self.text(text).encode("utf-8", errors="surrogateescape")

    def exception(self, exc: BaseException) -> None:
        """Mask secrets in an exception's arguments and its whole cause/context chain, in
        place: Celery stores and logs the formatted traceback of what it is given."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            masked = self.data(list(current.args))
            if masked != list(current.args):
                current.args = tuple(masked)
            current = current.__cause__ or current.__context__

    def values(self, value: Any) -> Any:
        """A copy of nested data with configured secret values masked (keys not judged:
        for results, which a caller may legitimately shape with a "token" field)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.values(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.values(v) for v in value]
        return value

    def data(self, value: Any, key: str = "") -> Any:
        """A copy of nested data with secrets masked (values under sensitive keys too)."""
        if key and SENSITIVE_KEY.search(key) and isinstance(value, str | bytes) and value:
            return MASK
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.data(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.data(v) for v in value]
        return value

    def processor(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        """A structlog processor for the event dict: masks values under sensitive keys.

        Configured secret values are removed from the rendered line by :meth:`rendered`,
        one regex pass per line instead of a walk over nested data.
        """
        for key, value in event_dict.items():
            if SENSITIVE_KEY.search(key) and isinstance(value, str | bytes) and value:
                event_dict[key] = MASK
        return event_dict

    def rendered(self, _logger: Any, _method: str, line: Any) -> Any:
        """A structlog processor after the renderer: masks secrets in the final text."""
        return self.text(line) if isinstance(line, str) else line


def run_security_checks(settings: Any, *, production: bool) -> list[str]:
    """Warn (log) about missing or weak secrets; returns the warnings."""
    log = structlog.get_logger("reliability.security")
    warnings: list[str] = []
    providers = settings.providers
    for name in ("payment_api_key", "notification_api_key"):
        secret = getattr(providers, name)
        value = secret.get_secret_value() if secret is not None else ""
        if not value:
            warnings.append(f"providers.{name} is not set")
        elif len(value) < 16:
            warnings.append(f"providers.{name} is shorter than 16 characters")
    redis_url = settings.redis.url.get_secret_value() if settings.redis.url else ""
    if production and redis_url and "@" not in redis_url and "unix" not in redis_url:
        warnings.append("redis.url has no password: production Redis should require AUTH")
    for warning in warnings:
        log.warning("security_check_warning", problem=warning)
    if not warnings:
        log.info("security_checks_passed")
    return warnings
