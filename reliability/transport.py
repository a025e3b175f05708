"""A kombu Redis transport whose message pop cannot lose a message.

Why not kombu's own: kombu pops with ``BRPOP`` and records the message as unacked with a
*second* command. If Redis crashes (or the worker is SIGKILLed) between the two, the
popped message exists only in the worker's memory and is lost — even with AOF
``appendfsync always``. Our chaos test hit that window in about one Redis crash of
three. No library offers an atomic pop for kombu, so this transport changes only that:

* a worker consuming one queue moves each message atomically (``BLMOVE``) into a
  processing list of its own (:mod:`reliability.orphans`), and records it as unacked *and*
  removes it from that list in one MULTI/EXEC (:mod:`reliability.unacked`) — so at every
  instant the message is in the queue, the processing list, or the unacked hash;
* a channel's first poll moves anything left in its process's processing list back to
  the queue (after a reconnect these are messages that were popped but never recorded);
* the processing lists of dead processes (their liveness key expired) are moved back by
  :func:`sweep_orphans`, which the maintenance leader runs.

Workers consuming several queues (or priority sub-queues) fall back to kombu's BRPOP,
with kombu's window; the README says so.

It also makes sure no item can stop the worker: kombu decodes a popped item inside the
consumer loop, where one that is not JSON, not a kombu envelope or megabytes large makes
the worker exit (and the next worker, handed the same item). Here each item is checked
first (:mod:`reliability.poison`); a poison item is dead-lettered before it leaves the
processing list, or put back at the end of its queue if it cannot be written. Acks a lost
connection left are settled by the next channel (:mod:`reliability.unacked`); the rest is kombu's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from queue import Empty
from typing import Any, cast

import structlog
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from reliability import orphans, unacked
from reliability.broker_url import ALIAS, SOCKET_FORMS, TCP_FORMS, TRANSPORT_PATH, broker_connection
from reliability.orphans import (
    ALIVE_REFRESH_SECONDS,
    ALIVE_TTL_MS,
    PRODUCER_PRIORITY_STEPS,
    REGISTRY,
    move_back,
    processing_key,
    text,
)
from reliability.poison import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Poison,
    PoisonSink,
    check_item,
    dead_letter,
    set_poison_sink,
)
from reliability.unacked import OWNERS, QoS, handed_over, set_running_tags

__all__ = [
    "ALIAS",
    "ALIVE_REFRESH_SECONDS",
    "ALIVE_TTL_MS",
    "FRONT_OF_QUEUE_HEADER",
    "OWNERS",
    "PRODUCER_PRIORITY_STEPS",
    "REGISTRY",
    "SOCKET_FORMS",
    "TCP_FORMS",
    "TRANSPORT_PATH",
    "Channel",
    "PoisonSink",
    "QoS",
    "Transport",
    "broker_connection",
    "restore_owned",
    "set_poison_sink",
    "set_running_tags",
    "sweep_orphans",
]

log = structlog.get_logger("reliability.transport")

# Messages carrying this header are published to the front of their queue (see _put).
FRONT_OF_QUEUE_HEADER = "rel_defer"


class Channel(kombu_redis.Channel):
    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "max_message_bytes")
    # Larger items are poison (``too_large``), dead-lettered without being decoded.
    max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    _reliable_moving: tuple[str, str] | None = None
    _reliable_recovered: set[str] | None = None
    _reliable_alive_at = 0.0
    # kombu's private API this channel builds on; celery-types does not declare it.
    connection_errors: tuple[type[BaseException], ...]
    _closing: bool
    _in_poll: Any
    _brpop_sent_at: float | None
    _queue_cycle: Any
    _q_for_pri: Callable[[str, int], str]
    _flush_brpop_reauth: Callable[[], None]
    _get_message_priority: Callable[..., int]

    @property
    def qos(self) -> unacked.QoS:
        """kombu's QoS of this channel, which ``QoS = QoS`` above makes ours."""
        return cast(unacked.QoS, super().qos)

    def _full(self, key: str) -> str:
        return f"{self.global_keyprefix}{key}"

    def processing_key(self, queue_key: str) -> str:
        return processing_key(queue_key, self.qos.owner)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        if handed_over():  # acks and records a lost connection left for this one
            with self.conn_or_acquire() as client:
                self.qos.settle_handed_over(client)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if len(keys) != 1:
            self._queue_cycle.rotate(queues[0])
            # kombu private API (celery-types does not declare it): its BRPOP.
            super()._brpop_start(timeout)  # type: ignore[misc]
            return
        key, queue = keys[0], queues[0]
        processing = self.processing_key(key)
        self._prepare(key, processing)
        self._reliable_moving = (queue, processing)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(
            "BLMOVE", self._full(key), self._full(processing), "RIGHT", "LEFT", timeout or 0
        )

    def _prepare(self, key: str, processing: str) -> None:
        """Once per channel and queue: recover leftovers; now and then: prove liveness."""
        now = time.monotonic()
        recovered = self._reliable_recovered
        if recovered is None:
            recovered = self._reliable_recovered = set()
        if processing not in recovered or now - self._reliable_alive_at > ALIVE_REFRESH_SECONDS:
            with self.conn_or_acquire() as client:
                if processing not in recovered:
                    moved = move_back(client, self._full(processing), self._full(key))
                    if moved:
                        kombu_redis.logger.warning(
                            "Restored %d popped but unheld message(s) to %s", moved, key
                        )
                    recovered.add(processing)
                # kombu prefixes the key of HSET and SET itself; not of LMOVE/EXISTS.
                client.execute_command("HSET", REGISTRY, self._full(processing), self._full(key))
                client.execute_command("SET", processing + ":alive", "1", "PX", ALIVE_TTL_MS)
            self._reliable_alive_at = now

    def _brpop_read(self, **options: Any) -> bool:
        moving = self._reliable_moving
        if moving is None:
            return self._brpop_read_fallback(**options)
        queue, processing = moving
        try:
            item = self._reply("BLMOVE", **options)
            if item is None:
                return False
            self._queue_cycle.rotate(queue)
            self._deliver_item(item, queue, self._full(processing))
            return True
        finally:
            self._reliable_moving = None
            self._in_poll = None
            self._flush_brpop_reauth()

    def _brpop_read_fallback(self, **options: Any) -> bool:
        """kombu's BRPOP read (several queues), with the item checked before decoding."""
        try:
            dest_item = self._reply("BRPOP", **options)
            if dest_item is None:
                return False
            dest, item = dest_item
            queue = text(dest).rsplit(self.sep, 1)[0]  # the client strips the key prefix
            self._queue_cycle.rotate(queue)
            self._deliver_item(item, queue, None)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _reply(self, command: str, **options: Any) -> Any:
        """The blocking pop's reply; ``Empty`` when it timed out, None when the channel
        is closing and the connection is gone (a close must not fail: celery#9250).

        A timeout is a nil reply; an empty item (``LPUSH q ""``) is ``b""``, already moved
        into the processing list: it is delivered (and dead-lettered as poison there),
        never read as a timeout, or it would stay in that list forever."""
        try:
            reply = self.client.parse_response(self.client.connection, command, **options)
        except self.connection_errors:
            if self.client.connection is not None:
                self.client.connection.disconnect()
            if self._closing:
                return None
            raise
        if reply is None:
            raise Empty()
        return reply

    def _deliver_item(self, item: bytes, queue: str, processing: str | None) -> None:
        """Check the item, then deliver it (recorded unacked and removed from the
        processing list in one step, see QoS.append) — or hand it to the poison sink."""
        try:
            payload = check_item(item, self.max_message_bytes)
        except Poison as poison:
            self._poisoned(item, queue, processing, poison)
            return
        qos = self.qos
        qos.pending = None if processing is None else (processing, item)
        try:
            self.connection._deliver(payload, queue)
        finally:
            qos.pending = None

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """kombu's polling get (``basic_get``), with the item checked before decoding."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item is not None:  # b"" is an empty item (poison), not an empty queue
                    try:
                        return check_item(item, self.max_message_bytes)
                    except Poison as poison:
                        self._poisoned(item, queue, None, poison)
            raise Empty()

    def _poisoned(self, item: bytes, queue: str, processing: str | None, poison: Poison) -> None:
        """Dead-letter a poison item, then let it leave; if it cannot be written, put it
        back at the end of its queue (it is retried when the store answers again)."""
        raw = item if isinstance(item, bytes) else str(item).encode()
        written = dead_letter(raw, queue, poison)
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            if processing is not None:
                # LREM/LPUSH: kombu prefixes LPUSH itself, not LREM (the key is already full).
                pipe.execute_command("LREM", processing, 1, item)
            if not written:
                pipe.lpush(self._q_for_pri(queue, 0), item)
            pipe.execute()

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        """Parked copies the mover republishes go to the *front* of their queue.

        Their time has come (a retry delay or a reserved rate-limit slot): behind a
        backlog of new work they would run late, and then all at once.
        """
        headers = message.get("headers") or {}
        if not headers.get(FRONT_OF_QUEUE_HEADER) or kwargs.get("_publish_batch") is not None:
            return super()._put(queue, message, **kwargs)
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            client.rpush(key, dumps(message))  # consumers pop from the right
        return None


class Transport(kombu_redis.Transport):
    Channel = Channel


def sweep_orphans(app: Any) -> int:
    """Return stranded messages to their queues (:func:`reliability.orphans.sweep`): dead
    processes' processing lists and priority sub-queues. Returns how many were moved."""
    with app.pool.acquire(block=True) as conn:  # a pooled connection, not a new one
        channel = conn.default_channel
        if not isinstance(channel, Channel):
            return 0
        with channel.conn_or_acquire() as client:
            return orphans.sweep(client, channel.global_keyprefix, channel.sep)


def restore_owned(app: Any, worker: str) -> int:
    """Hand a dead worker's messages back to their queues: its unacked messages (restored
    by tag, to the front) and its processing lists. Returns how many were moved."""
    with app.pool.acquire(block=True) as conn:  # a pooled connection, not a new one
        channel = conn.default_channel
        if not isinstance(channel, Channel):
            return 0  # RabbitMQ requeues a dead consumer's messages itself
        with channel.conn_or_acquire() as client:

            def restore_tag(tag: str) -> None:
                channel.qos.restore_by_tag(tag, client=client, leftmost=False)

            return orphans.restore(client, channel.global_keyprefix, worker, OWNERS, restore_tag)
