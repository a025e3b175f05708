"""Broker URLs: which transport a Redis broker URL needs so that ours is in effect.

Why this is needed: kombu picks the transport from a URL's ``x+`` prefix
(``redis+socket://`` -> its own Redis transport), ignoring the configured one. Socket URLs
therefore name our transport (``reliability.transport``) by an alias; TCP URLs keep their
form and name it as the broker transport. Other URLs (AMQP) are left alone.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

ALIAS = "reliable"
TRANSPORT_PATH = "reliability.transport:Transport"
SOCKET_FORMS = ("redis+socket://", "unix://", "socket://")
TCP_FORMS = ("redis://", "rediss://")


def broker_connection(url: str) -> tuple[str, str | None]:
    """``(broker_url, broker_transport)`` that put this transport in effect for a Redis
    broker URL in any accepted form; other URLs (AMQP) are returned unchanged."""
    for form in SOCKET_FORMS:
        if url.startswith(form):
            TRANSPORT_ALIASES.setdefault(ALIAS, TRANSPORT_PATH)
            return f"{ALIAS}+socket://{url[len(form) :]}", TRANSPORT_PATH
    if url.startswith(TCP_FORMS):
        return url, TRANSPORT_PATH
    return url, None
