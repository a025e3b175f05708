"""Unacked records of the reliable transport: written with the pop, settled after reconnects.

Why its own module: the record is where the transport's promise is kept. kombu records a
popped message as unacked with a second command after the pop; our :class:`QoS` writes the
record *and* removes the message from the worker's processing list in one MULTI/EXEC, so at
every instant the message is in its queue, the processing list or the unacked hash. It
also records which worker holds each message (:data:`OWNERS`), so the maintenance leader
can restore a dead worker's messages at once (see ``heartbeat.py``).

And a channel whose connection is gone (a Redis restart while tasks ran) must not fail
its acks, rejects or close: the tags are handed over instead, and the next channel
settles them (:meth:`QoS.settle_handed_over`) — late acks removed, uncertain records
restored, except those of tasks still running in this process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from kombu.utils.objects import cached_property

from reliability.heartbeat import identity

log = structlog.get_logger("reliability.transport")

# Which worker holds each unacked message (delivery tag -> worker identity).
OWNERS = "_reliable.owner"
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


def handed_over() -> bool:
    """True while tags wait for a channel to settle them (checked on every poll: cheap)."""
    return bool(_LATE_ACKS or _UNCERTAIN_TAGS)


class QoS(kombu_redis.QoS):
    """Records the unacked message and clears it from the processing list atomically."""

    channel: kombu_redis.Channel
    # (processing list, raw item) of the message being delivered; set by the channel
    # around its delivery, None for messages popped without a processing list (BRPOP).
    pending: tuple[str, bytes] | None = None

    @cached_property
    def owner(self) -> str:
        """This worker's identity, recorded as the holder of each message it takes."""
        return identity()

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        return self.channel.connection.connection_errors

    def _gone_errors(self) -> tuple[type[BaseException], ...]:
        """What a call on a channel whose connection is gone raises (kombu: AttributeError
        on the client it dropped)."""
        return (AttributeError, *self._connection_errors())

    def append(self, message: Any, delivery_tag: str) -> None:
        pending = self.pending
        delivery = message.delivery_info
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                    self.unacked_key,
                    delivery_tag,
                    dumps([message._raw, delivery["exchange"], delivery["routing_key"]]),
                ).hset(OWNERS, delivery_tag, self.owner)
                if pending is not None:
                    # LREM is not in kombu's prefixed commands: the key is already full.
                    pipe.execute_command("LREM", pending[0], 1, pending[1])
                pipe.execute()
        except self._connection_errors():
            if pending is not None:
                # The record may have been applied with its reply lost: the message is
                # then unacked with nobody holding it. The next channel restores it.
                _UNCERTAIN_TAGS.append(delivery_tag)
            raise
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        """kombu's removal of the unacked record, plus its owner (see OWNERS)."""
        # kombu private API (not in celery-types' stubs): the method its ack builds on.
        removal = super()._remove_from_indices(delivery_tag, pipe)  # type: ignore[misc]
        return removal.hdel(OWNERS, delivery_tag)

    def _connection_gone(self) -> bool:
        channel = self.channel
        return bool(
            channel.closed or channel.connection is None or channel.connection.client is None
        )

    def ack(self, delivery_tag: str) -> None:
        """Ack; if this channel's connection is gone (a Redis restart while the task ran),
        the unacked record is removed through the next channel instead of failing."""
        if not self._connection_gone():
            try:
                super().ack(delivery_tag)
                return
            except self._gone_errors() as exc:
                log.warning(
                    "ack_deferred_until_reconnect", delivery_tag=str(delivery_tag), error=str(exc)
                )
        _LATE_ACKS.append(str(delivery_tag))
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not self._connection_gone():
            try:
                super().reject(delivery_tag, requeue=requeue)
                return
            except self._gone_errors() as exc:
                log.warning(
                    "reject_deferred_until_reconnect",
                    delivery_tag=str(delivery_tag),
                    error=str(exc),
                )
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
        except self._gone_errors() as exc:
            log.warning(
                "unacked_restore_deferred", count=len(self._delivered or ()), error=str(exc)
            )
            self._hand_over()

    def _hand_over(self) -> None:
        delivered = self._delivered
        if delivered is not None:
            _UNCERTAIN_TAGS.extend(str(tag) for tag in delivered)
            delivered.clear()

    def settle_handed_over(self, client: Any) -> None:
        """Finish what a lost connection left, through ``client``: late acks first, then
        restore the records nobody may hold (not those of tasks still running here)."""
        acked = 0
        while _LATE_ACKS:
            tag = _LATE_ACKS.pop()
            self._remove_from_indices(tag, client.pipeline()).execute()
            acked += 1
        running = _running_tags()
        keep = [tag for tag in _UNCERTAIN_TAGS if tag in running]
        restored = 0
        for tag in _UNCERTAIN_TAGS:
            if tag not in running:
                self.restore_by_tag(tag, client=client)
                restored += 1
        _UNCERTAIN_TAGS[:] = keep
        log.warning(
            "unacked_settled_after_reconnect",
            acked=acked,
            restored=restored,
            still_running=len(keep),
        )
