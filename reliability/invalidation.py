"""The invalidation listener of the tracked cache: one connection, one daemon thread.

Why its own module: :mod:`reliability.cache` decides what is cached and when a read may
be cached; this keeps the connection Redis sends its invalidations to alive. It
subscribes to ``__redis__:invalidate`` (RESP2 ``CLIENT TRACKING ... REDIRECT <id>``
sends them there), hands each message to its :class:`InvalidationTarget`, PINGs an idle
connection to find a half-open socket, and reconnects with a doubling backoff. Whatever
ends a subscription, the target hears :meth:`InvalidationTarget.on_unsubscribed` before
anything else happens, so it can flush at once and never serve a value it was not told of.

It also watches the target's idle data connection: Redis forgets the tracking of a
connection it closed, so a killed data connection must flush the cache now, not at the
next miss.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any, Protocol

import redis
import structlog

log = structlog.get_logger("reliability.cache")

INVALIDATION_CHANNEL = "__redis__:invalidate"
POLL_SECONDS = 0.2  # how often the listener looks at its stop flag while idle
HEALTH_CHECK_SECONDS = 1.0  # PING an idle invalidation connection this often (half-open sockets)
RECONNECT_FIRST_SECONDS = 0.05  # listener reconnect backoff: first delay, doubled up to the max
RECONNECT_MAX_SECONDS = 1.0


class InvalidationTarget(Protocol):
    """What the listener reports to (the cache); each call comes from the listener thread."""

    def on_subscribed(self, client_id: int) -> None:
        """Subscribed as CLIENT ID ``client_id``: reads may be tracked from now on."""

    def on_unsubscribed(self) -> None:
        """The subscription ended (or never began): nothing tracked can be trusted."""

    def on_invalidate(self, keys: list[str] | None) -> None:
        """Redis says ``keys`` changed; ``None``: everything (FLUSHDB, FLUSHALL)."""

    def idle_data_connection(self) -> Any:
        """The data connection to watch for EOF while idle, or None."""

    def on_data_readable(self, data: Any) -> None:
        """The watched data connection has bytes (a reply a reader takes next, or EOF)."""


class InvalidationListener:
    """Runs the invalidation connection for ``target`` on a daemon thread, started by
    :meth:`ensure_running` and ended by :meth:`stop`. One per process (fork: a new one)."""

    def __init__(
        self, pool: redis.ConnectionPool, target: InvalidationTarget, *, socket_timeout: float
    ) -> None:
        self._pool = pool
        self._target = target
        self._socket_timeout = socket_timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._established = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        """Start the thread if it is not running; the first call waits (up to the socket
        timeout) for the first subscription, so first reads are cached, not bypassed."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._listen, name="tracked-cache-invalidations", daemon=True
                )
                self._thread.start()
        self._established.wait(self._socket_timeout)

    def stop(self) -> None:
        """Ask the thread to end and wait for it briefly (it checks every POLL_SECONDS)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_SECONDS * 5)

    def _listen(self) -> None:
        delay, quiet = RECONNECT_FIRST_SECONDS, False
        while not self._stop.is_set():
            conn: Any = self._pool.make_connection()  # redis-py types its commands loosely
            try:
                conn.send_command("CLIENT", "ID")
                client_id = int(conn.read_response())
                conn.send_command("SUBSCRIBE", INVALIDATION_CHANNEL)
                conn.read_response()
                self._target.on_subscribed(client_id)  # from now on misses are cached
                self._established.set()
                log.info("cache_tracking_established", client_id=client_id)
                delay, quiet = RECONNECT_FIRST_SECONDS, False
                self._pump(conn)
            except Exception as exc:  # whatever it was, on_unsubscribed keeps us correct
                if not (quiet or self._stop.is_set()):
                    log.warning(
                        "cache_invalidation_connection_lost", error=f"{type(exc).__name__}: {exc}"
                    )
                quiet = True  # one warning per outage, not one per reconnect attempt
            finally:
                self._target.on_unsubscribed()
                conn.disconnect()
            self._established.set()  # never make a first reader wait on a Redis that is down
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _pump(self, conn: Any) -> None:
        """Apply invalidation messages until stopped; PING when idle to detect dead peers,
        and watch the idle data socket for EOF."""
        last_heard: float = time.monotonic()
        ping_sent: float | None = None
        while not self._stop.is_set():
            if conn.can_read(0):
                self._on_message(conn.read_response())
                last_heard, ping_sent = time.monotonic(), None
                continue
            data = self._target.idle_data_connection()
            data_sock = getattr(data, "_sock", None)
            sockets = [conn._sock, data_sock] if data_sock else [conn._sock]
            try:
                readable = select.select(sockets, [], [], POLL_SECONDS)[0]
            except (OSError, ValueError):  # a reader closed the data socket meanwhile
                readable = []
            if data_sock is not None and data_sock in readable:
                self._target.on_data_readable(data)
            now = time.monotonic()
            if ping_sent is not None and now - ping_sent > self._socket_timeout:
                raise redis.TimeoutError("invalidation connection did not answer PING")
            if ping_sent is None and now - last_heard >= HEALTH_CHECK_SECONDS:
                conn.send_command("PING")
                ping_sent = now

    def _on_message(self, message: Any) -> None:
        if not isinstance(message, list) or len(message) != 3 or message[0] != "message":
            return  # PING replies and subscribe confirmations
        self._target.on_invalidate(message[2])
