"""Admin authentication: a bearer token, and throttling of clients that keep failing.

Tokens are named (``RELIABLE_OPS__ADMIN_TOKENS='{"alice": "<token>"}'``): the name is
who the audit trail records. Every configured token is compared in constant time
(``hmac.compare_digest``), all of them, so timing tells nothing. No credentials is 401,
a wrong token 403. Failures are counted per client address with the project's own
fleet-wide limiter (a sliding window, so every ops replica agrees); a client over the
limit gets 429 with ``Retry-After`` and seed 002's ``X-RateLimit-*`` headers before its
token is even looked at.
"""

from __future__ import annotations

import hmac
import math
from typing import Any

from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from reliability.ratelimit import RateLimit, RateLimiter

bearer = HTTPBearer(auto_error=False, description="RELIABLE_OPS__ADMIN_TOKENS")


class Auth:
    """Checks admin credentials for one ops service."""

    def __init__(self, store: Any, tokens: dict[str, str], failures: int, window: float) -> None:
        self.store = store
        self.tokens = [(name, token.encode()) for name, token in sorted(tokens.items())]
        self.limit = RateLimit(
            name="ops-auth-failures",
            kind="sliding",
            max_requests=failures,
            window_seconds=window,
            per="ip",
        )

    def _limiter(self, client: str) -> RateLimiter:
        return RateLimiter(self.store, self.limit, client)

    def _headers(self, remaining: float, reset_seconds: float | None = None) -> dict[str, str]:
        """Seed 002's headers; the reset is when the oldest failure leaves the window (the
        whole window when not known)."""
        wait = self.limit.window_seconds if reset_seconds is None else reset_seconds
        reset = str(max(1, math.ceil(wait)))
        return {
            "X-RateLimit-Limit": str(self.limit.max_requests),
            "X-RateLimit-Remaining": str(max(0, int(remaining))),
            "X-RateLimit-Reset": reset,
        }

    def _fail(self, limiter: RateLimiter, status: int, detail: str) -> HTTPException:
        limiter.try_acquire()
        headers = self._headers(limiter.available_tokens)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return HTTPException(status, detail, headers=headers)

    def who(self, client: str, credentials: HTTPAuthorizationCredentials | None) -> str:
        """The token's name; raises the 401/403/429 the request gets otherwise."""
        limiter = self._limiter(client)
        remaining = limiter.available_tokens
        if remaining < 1:
            headers = self._headers(0, limiter.seconds_until_available())
            headers["Retry-After"] = headers["X-RateLimit-Reset"]
            raise HTTPException(429, "too many failed authentications; retry later", headers)
        if not self.tokens:
            raise self._fail(limiter, 403, "the admin API is closed: no RELIABLE_OPS__ADMIN_TOKENS")
        if credentials is None or not credentials.credentials:
            raise self._fail(limiter, 401, "admin endpoints need 'Authorization: Bearer <token>'")
        given = credentials.credentials.encode("utf-8", "surrogateescape")
        found = None
        for name, token in self.tokens:
            if hmac.compare_digest(given, token) and found is None:
                found = name
        if found is None:
            raise self._fail(limiter, 403, "that token is not an admin token")
        return found


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"
