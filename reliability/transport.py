"""A kombu Redis transport whose message pop cannot lose a message.

Why not kombu's own: kombu pops with ``BRPOP`` and records the message as unacked with a
*second* command. If Redis crashes (or the worker is SIGKILLed) between the two, the
popped message exists only in the worker's memory and is lost — even with AOF
``appendfsync always``. Our chaos test hit that window in about one Redis crash of
three. No library offers an atomic pop for kombu, so this transport changes only that:

* a worker consuming one queue moves each message atomically (``BLMOVE``) into a
  processing list of its own, and records it as unacked *and* removes it from that list
  in one MULTI/EXEC — so at every instant the message is in the queue, the processing
  list, or the unacked hash;
* a channel's first poll moves anything left in its process's processing list back to
  the queue (after a reconnect these are messages that were popped but never recorded);
* the processing lists of dead processes (their liveness key expired) are moved back by
  :func:`sweep_orphans`, which the maintenance leader runs.

Workers consuming several queues (or priority sub-queues) fall back to kombu's BRPOP,
with kombu's window; the README says so.

It also makes sure no item can stop the worker. kombu decodes a popped item inside the
consumer loop, so an item that is not JSON, not a kombu envelope or megabytes large
raises there and the worker exits (and the next worker, handed the same item, exits
too). Here every item is checked first (:mod:`reliability.poison`) and a poison item
is handed to the poison sink — the consumer writes it to the DLQ — before it leaves
the processing list; if the sink cannot write it, it goes back to the end of its queue.
And a channel closed after its connection is gone (a Redis restart) no longer fails
while restoring its unacked messages: they are restored by tag after reconnecting.
Everything else is kombu's transport.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps
from kombu.utils.objects import cached_property

from reliability.heartbeat import identity
from reliability.poison import DEFAULT_MAX_MESSAGE_BYTES, Poison, check_item

log = structlog.get_logger("reliability.transport")

# Liveness of a process's processing list: refreshed at most this often, expires after.
ALIVE_REFRESH_SECONDS = 5.0
ALIVE_TTL_MS = 30_000
REGISTRY = "_reliable.processing"
# Which worker holds each unacked message (delivery tag -> worker identity), so the
# maintenance leader can restore a dead worker's messages at once (see heartbeat.py).
OWNERS = "_reliable.owner"
# Messages carrying this header are published to the front of their queue (see _put).
FRONT_OF_QUEUE_HEADER = "rel_defer"
# Delivery tags whose unacked record may exist without anyone holding the message:
# restored by tag through the next channel (unless the task is still running here).
_UNCERTAIN_TAGS: list[str] = []
# Delivery tags acked (or rejected for good) while their channel's connection was gone:
# their unacked records are removed through the next channel.
_LATE_ACKS: list[str] = []


def _nothing_running() -> set[str]:
    return set()


# Delivery tags of tasks still running in this process (the worker's consumer knows):
# their messages are not restored after a reconnect, they are acked when they end.
_running_tags: Callable[[], set[str]] = _nothing_running


def set_running_tags(fn: Callable[[], set[str]]) -> None:
    """Install what tells the transport which delivery tags are still being worked on."""
    global _running_tags
    _running_tags = fn

# Writes a poison item to the DLQ: (raw item, queue, what is wrong) -> True once written.
# Installed by the worker's consumer, which knows the state store.
PoisonSink = Callable[[bytes, str, Poison], bool]
_poison_sink: PoisonSink | None = None


def set_poison_sink(sink: PoisonSink | None) -> None:
    """Install the function that dead-letters poison items (the worker's consumer does)."""
    global _poison_sink
    _poison_sink = sink


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """Records the unacked message and clears it from the processing list atomically."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        pending = self.channel._reliable_pending
        delivery = message.delivery_info
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                    self.unacked_key, delivery_tag,
                    dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                ).hset(OWNERS, delivery_tag, self.channel._reliable_owner)
                if pending is not None:
                    # LREM is not in kombu's prefixed commands: the key is already full.
                    pipe.execute_command("LREM", pending[0], 1, pending[1])
                pipe.execute()
        except self.channel.connection_errors:
            if pending is not None:
                # The record may have been applied with its reply lost: the message is
                # then unacked with nobody holding it. The next channel restores it.
                _UNCERTAIN_TAGS.append(delivery_tag)
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: Any, pipe: Any = None) -> Any:
        """kombu's removal of the unacked record, plus its owner (see OWNERS)."""
        return super()._remove_from_indices(delivery_tag, pipe).hdel(OWNERS, delivery_tag)

    def _connection_gone(self) -> bool:
        channel = self.channel
        return bool(channel.closed or channel.connection is None
                    or channel.connection.client is None)

    def ack(self, delivery_tag: Any) -> None:
        """Ack; if this channel's connection is gone (a Redis restart while the task ran),
        the unacked record is removed through the next channel instead of failing."""
        if not self._connection_gone():
            try:
                super().ack(delivery_tag)
                return
            except (AttributeError, *self.channel.connection_errors) as exc:
                log.warning("ack_deferred_until_reconnect", delivery_tag=str(delivery_tag),
                            error=str(exc))
        _LATE_ACKS.append(str(delivery_tag))
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if not self._connection_gone():
            try:
                super().reject(delivery_tag, requeue=requeue)
                return
            except (AttributeError, *self.channel.connection_errors) as exc:
                log.warning("reject_deferred_until_reconnect", delivery_tag=str(delivery_tag),
                            error=str(exc))
        (_UNCERTAIN_TAGS if requeue else _LATE_ACKS).append(str(delivery_tag))
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        """Restore delivered messages when the channel closes; if Redis is gone (a restart),
        hand their tags to the next channel instead of failing the close (kombu then
        raises inside ``_connparams`` and the worker exits: celery#9250)."""
        if client is None and self.channel.connection.client is None:
            self._hand_over()
            return
        try:
            super().restore_unacked(client)
        except (AttributeError, *self.channel.connection_errors) as exc:
            log.warning("unacked_restore_deferred", count=len(self._delivered), error=str(exc))
            self._hand_over()

    def _hand_over(self) -> None:
        _UNCERTAIN_TAGS.extend(str(tag) for tag in self._delivered)
        self._delivered.clear()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "max_message_bytes")
    # Larger items are poison (``too_large``), dead-lettered without being decoded.
    max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    _reliable_pending: tuple[str, Any] | None = None
    _reliable_moving: tuple[str, str] | None = None
    _reliable_recovered: set[str] | None = None
    _reliable_alive_at = 0.0

    @cached_property
    def _reliable_owner(self) -> str:
        return identity()

    def _full(self, key: str) -> str:
        return f"{self.global_keyprefix}{key}"

    def processing_key(self, queue_key: str) -> str:
        return f"{queue_key}:processing:{self._reliable_owner}"

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        self._settle_orphans()
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        if len(keys) != 1:
            self._queue_cycle.rotate(queues[0])
            return super()._brpop_start(timeout)
        key, queue = keys[0], queues[0]
        processing = self.processing_key(key)
        self._prepare(key, processing)
        self._reliable_moving = (queue, processing)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command(
            "BLMOVE", self._full(key), self._full(processing), "RIGHT", "LEFT", timeout or 0
        )
        return None

    def _prepare(self, key: str, processing: str) -> None:
        """Once per channel and queue: recover leftovers; now and then: prove liveness."""
        now = time.monotonic()
        recovered = self._reliable_recovered
        if recovered is None:
            recovered = self._reliable_recovered = set()
        if processing not in recovered or now - self._reliable_alive_at > ALIVE_REFRESH_SECONDS:
            with self.conn_or_acquire() as client:
                if processing not in recovered:
                    moved = _move_back(client, self._full(processing), self._full(key))
                    if moved:
                        kombu_redis.logger.warning(
                            "Restored %d popped but unheld message(s) to %s", moved, key)
                    recovered.add(processing)
                # kombu prefixes the key of HSET and SET itself; not of LMOVE/EXISTS.
                client.execute_command("HSET", REGISTRY, self._full(processing), self._full(key))
                client.execute_command("SET", processing + ":alive", "1", "PX", ALIVE_TTL_MS)
            self._reliable_alive_at = now

    def _settle_orphans(self) -> None:
        """Finish what a lost connection left: late acks first, then restore messages
        whose records may exist with nobody holding them (not the ones still running)."""
        if not _LATE_ACKS and not _UNCERTAIN_TAGS:
            return
        with self.conn_or_acquire() as client:
            acked = 0
            while _LATE_ACKS:
                tag = _LATE_ACKS.pop()
                self.qos._remove_from_indices(tag, client.pipeline()).execute()
                acked += 1
            running = _running_tags()
            keep = [tag for tag in _UNCERTAIN_TAGS if tag in running]
            restored = 0
            for tag in _UNCERTAIN_TAGS:
                if tag not in running:
                    self.qos.restore_by_tag(tag, client=client)
                    restored += 1
            _UNCERTAIN_TAGS[:] = keep
        log.warning("unacked_settled_after_reconnect", acked=acked, restored=restored,
                    still_running=len(keep))

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
            queue = _text(dest).rsplit(self.sep, 1)[0]  # the client strips the key prefix
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
            raise kombu_redis.Empty()
        return reply

    def _deliver_item(self, item: bytes, queue: str, processing: str | None) -> None:
        """Check the item, then deliver it (recorded unacked and removed from the
        processing list in one step, see QoS.append) — or hand it to the poison sink."""
        try:
            payload = check_item(item, self.max_message_bytes)
        except Poison as poison:
            self._poisoned(item, queue, processing, poison)
            return
        self._reliable_pending = None if processing is None else (processing, item)
        try:
            self.connection._deliver(payload, queue)
        finally:
            self._reliable_pending = None

    def _get(self, queue: str) -> Any:
        """kombu's polling get (``basic_get``), with the item checked before decoding."""
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item is not None:  # b"" is an empty item (poison), not an empty queue
                    try:
                        return check_item(item, self.max_message_bytes)
                    except Poison as poison:
                        self._poisoned(item, queue, None, poison)
            raise kombu_redis.Empty()

    def _poisoned(self, item: bytes, queue: str, processing: str | None,
                  poison: Poison) -> None:
        """Dead-letter a poison item, then let it leave; if it cannot be written, put it
        back at the end of its queue (it is retried when the store answers again)."""
        raw = item if isinstance(item, bytes) else str(item).encode()
        sink = _poison_sink
        written = False
        if sink is not None:
            try:
                written = bool(sink(raw, queue, poison))
            except Exception:
                log.exception("poison_sink_failed", queue=queue, kind=poison.kind)
        else:
            log.error("poison_without_sink", queue=queue, kind=poison.kind, size=len(raw))
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


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


# kombu picks the transport from a URL's "x+" prefix (redis+socket:// -> its own Redis
# transport), ignoring the configured one: socket URLs name this transport by an alias.
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
            return f"{ALIAS}+socket://{url[len(form):]}", TRANSPORT_PATH
    if url.startswith(TCP_FORMS):
        return url, TRANSPORT_PATH
    return url, None


def _move_back(client: Any, processing: str, queue: str) -> int:
    moved = 0
    while client.execute_command("LMOVE", processing, queue, "LEFT", "RIGHT") is not None:
        moved += 1
    return moved


# Priority sub-queues a producer with kombu's default steps may publish to.
PRODUCER_PRIORITY_STEPS = (3, 6, 9)


def sweep_orphans(app: Any) -> int:
    """Return stranded messages to their queues; returns how many were moved.

    Processing lists of dead processes (liveness key expired) go back to their queue, and
    so do messages a producer published to a priority sub-queue, which workers with a
    single list per queue would otherwise never read.
    """
    with app.pool.acquire(block=True) as conn:  # a pooled connection, not a new one
        channel = conn.default_channel
        if not isinstance(channel, Channel):
            return 0
        moved = 0
        with channel.conn_or_acquire() as client:
            entries = _pairs(client.execute_command("HGETALL", channel._full(REGISTRY)) or {})
            for processing, queue in entries:
                if not client.execute_command("EXISTS", f"{processing}:alive"):
                    moved += _move_back(client, processing, queue)
                    client.execute_command("HDEL", REGISTRY, processing)
                for step in PRODUCER_PRIORITY_STEPS:
                    moved += _move_back(client, f"{queue}{channel.sep}{step}", queue)
        return moved


def restore_owned(app: Any, worker: str) -> int:
    """Hand a dead worker's messages back to their queues: its unacked messages (restored
    by tag, to the front) and its processing lists. Returns how many were moved."""
    with app.pool.acquire(block=True) as conn:  # a pooled connection, not a new one
        channel = conn.default_channel
        if not isinstance(channel, Channel):
            return 0  # RabbitMQ requeues a dead consumer's messages itself
        moved = 0
        with channel.conn_or_acquire() as client:
            owners = _pairs(client.execute_command("HGETALL", channel._full(OWNERS)) or {})
            for tag, owner in owners:
                if owner == worker:
                    channel.qos.restore_by_tag(tag, client=client, leftmost=False)
                    moved += 1
            suffix = f":processing:{worker}"
            lists = _pairs(client.execute_command("HGETALL", channel._full(REGISTRY)) or {})
            for processing, queue in lists:
                if processing.endswith(suffix):
                    moved += _move_back(client, processing, queue)
                    client.execute_command("HDEL", channel._full(REGISTRY), processing)
        return moved


def _pairs(flat: Any) -> list[tuple[str, str]]:
    if isinstance(flat, dict):
        return [(_text(k), _text(v)) for k, v in flat.items()]
    items = [_text(x) for x in flat]
    return list(zip(items[::2], items[1::2], strict=True))
