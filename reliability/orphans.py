"""Processing lists: where a popped message waits for its record, and the ones left behind.

The reliable transport moves each message it pops into a processing list of its own
process (``<queue>:processing:<worker>``), registered in :data:`REGISTRY` with a liveness
key it refreshes. Why a module of their own: two sides share these names — the channel
that fills and recovers its own lists (``reliability.transport``), and the fleet's
maintenance leader that returns what dead processes left (:func:`sweep`,
:func:`restore`) — and both must agree on them.

The functions take kombu's client for the broker: it prefixes the keys of some commands
itself (HSET, HDEL, SET, LPUSH) and not of others (HGETALL, EXISTS, LMOVE), so every
name here is passed bare or full accordingly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Liveness of a process's processing list: refreshed at most this often, expires after.
ALIVE_REFRESH_SECONDS = 5.0
ALIVE_TTL_MS = 30_000
# Hash: processing list -> the queue it drains (both full key names).
REGISTRY = "_reliable.processing"
# Priority sub-queues a producer with kombu's default steps may publish to.
PRODUCER_PRIORITY_STEPS = (3, 6, 9)


def processing_key(queue_key: str, worker: str) -> str:
    """The processing list of ``worker`` (its identity) for the queue key ``queue_key``."""
    return f"{queue_key}:processing:{worker}"


def text(value: Any) -> str:
    """A Redis reply item as text (clients with and without ``decode_responses``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def move_back(client: Any, processing: str, queue: str) -> int:
    """Move every message of ``processing`` to the end its queue is read from; returns how
    many. Both names are full keys (LMOVE is not prefixed by kombu)."""
    moved = 0
    while client.execute_command("LMOVE", processing, queue, "LEFT", "RIGHT") is not None:
        moved += 1
    return moved


def sweep(client: Any, prefix: str, sep: str) -> int:
    """Return stranded messages to their queues; returns how many were moved.

    Processing lists of dead processes (liveness key expired) go back to their queue, and
    so do messages a producer published to a priority sub-queue (``<queue><sep><step>``),
    which workers with a single list per queue would otherwise never read.
    """
    moved = 0
    for processing, queue in _pairs(client.execute_command("HGETALL", prefix + REGISTRY)):
        if not client.execute_command("EXISTS", f"{processing}:alive"):
            moved += move_back(client, processing, queue)
            client.execute_command("HDEL", REGISTRY, processing)
        for step in PRODUCER_PRIORITY_STEPS:
            moved += move_back(client, f"{queue}{sep}{step}", queue)
    return moved


def restore(
    client: Any, prefix: str, worker: str, owners: str, restore_tag: Callable[[str], None]
) -> int:
    """Hand a dead worker's messages back: each unacked one it held (the ``owners`` hash,
    tag -> worker; ``restore_tag`` puts one back) and its processing lists. Returns how
    many were moved."""
    moved = 0
    for tag, owner in _pairs(client.execute_command("HGETALL", prefix + owners)):
        if owner == worker:
            restore_tag(tag)
            moved += 1
    suffix = processing_key("", worker)
    for processing, queue in _pairs(client.execute_command("HGETALL", prefix + REGISTRY)):
        if processing.endswith(suffix):
            moved += move_back(client, processing, queue)
            client.execute_command("HDEL", REGISTRY, processing)
    return moved


def _pairs(flat: Any) -> list[tuple[str, str]]:
    """HGETALL's reply as (field, value) pairs: a dict, or RESP2's flat list."""
    if not flat:
        return []
    if isinstance(flat, dict):
        return [(text(k), text(v)) for k, v in flat.items()]
    items = [text(x) for x in flat]
    return list(zip(items[::2], items[1::2], strict=True))
