"""Calls to downstream HTTP APIs, classified the way every task needs them.

Each call carries the delivery's ``Idempotency-Key``, fencing number and correlation id,
so a provider that honours keys sees one effect per key and can refuse a holder whose
lease was taken over. 5xx, 429 and timeouts are transient (a ``Retry-After`` is kept
as the retry hint); other 4xx are permanent; 409 on a stale fence is its own error.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from reliability.delivery import outgoing_headers
from reliability.errors import PermanentError, StaleFencingToken, TransientError

_local = threading.local()


def _client(timeout: float) -> httpx.Client:
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = httpx.Client(timeout=timeout)
    return client


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def post(
    url: str, payload: dict[str, Any], *, timeout: float = 10.0, api_key: str | None = None
) -> dict[str, Any]:
    """POST JSON with the delivery's headers; returns the JSON reply or raises classified."""
    headers = outgoing_headers()
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        response = _client(timeout).post(url, json=payload, headers=headers)
    except httpx.TimeoutException as exc:
        raise TransientError(f"timeout calling {url}") from exc
    except httpx.TransportError as exc:
        raise TransientError(f"cannot reach {url}: {exc}") from exc
    status = response.status_code
    if status >= 500 or status == 429:
        raise TransientError(f"{url} answered {status}", retry_after=_retry_after(response))
    if status == 409 and "fenc" in response.text:
        raise StaleFencingToken(f"{url} refused a stale fencing token: {response.text[:200]}")
    if status >= 400:
        raise PermanentError(f"{url} answered {status}: {response.text[:200]}")
    return response.json() if response.content else {}
