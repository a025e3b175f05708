"""Poison: whatever sits on a queue that can never be a task, told apart before it is decoded.

Producers send garbage: text that is not JSON, binary, JSON without kombu's envelope or
Celery's headers, megabytes. Unchecked, one such item makes kombu or Celery raise inside
the consumer loop and the worker exits (and the next worker, handed the same item, exits
too). Every item is therefore checked here first, in time linear in its size:

* :func:`check_item` — the raw bytes popped from a Redis queue: at most ``max_bytes``
  (checked before anything is decoded), UTF-8 JSON, a kombu envelope whose fields have
  the types kombu and Celery read (a body that decodes with its stated encoding, a
  delivery tag, dict headers and properties);
* :func:`check_size` — a message body from any broker (RabbitMQ included).

A failed check raises :class:`Poison`; the caller dead-letters the raw bytes (base64,
capped at :data:`MAX_RAW_BYTES`) *before* the item leaves the queue, logs and counts it.
The transport does that through the poison sink (:func:`dead_letter`), which the worker's
consumer installs because it knows the state store.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

import structlog

from reliability.delivery import PRODUCER_HEADERS

log = structlog.get_logger("reliability.transport")

# Raw bytes kept in a DLQ entry for an item that could not be decoded.
MAX_RAW_BYTES = 64 * 1024
# Default largest message accepted (bytes of the item on the queue): larger is poison.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


class Poison(Exception):
    """An item that can never run. ``kind`` is a short stable code (``too_large``,
    ``not_json``, ``bad_envelope``, ...); ``reason`` says what was wrong, for people."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


def check_size(size: int, max_bytes: int) -> None:
    """Raise ``too_large`` when a message is bigger than the limit (0 = no limit)."""
    if max_bytes and size > max_bytes:
        raise Poison("too_large", f"message of {size:,} bytes exceeds the {max_bytes:,}-byte limit")


def check_item(item: bytes | str, max_bytes: int) -> dict[str, Any]:
    """The kombu envelope held by a raw Redis queue item, or :class:`Poison`."""
    raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
    if not raw:
        raise Poison("empty", "an empty item (no message at all)")
    check_size(len(raw), max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Poison(
            "not_utf8", f"bytes that are not UTF-8 text ({exc.reason} at {exc.start})"
        ) from None
    try:
        payload = json.loads(text)
    except RecursionError:
        raise Poison("not_json", "JSON nested too deeply") from None
    except ValueError as exc:
        raise Poison("not_json", f"not JSON: {exc}") from None
    return check_envelope(payload)


def check_envelope(payload: Any) -> dict[str, Any]:
    """Check the fields kombu's virtual transport and Celery's consumer read, and their types."""
    if not isinstance(payload, dict):
        raise Poison("bad_envelope", f"a JSON {type(payload).__name__}, not a kombu envelope")
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        raise Poison("bad_envelope", "no 'properties' object (not a kombu message)")
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        raise Poison("bad_envelope", "no delivery tag in 'properties'")
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), str) for k in ("exchange", "routing_key")
    ):
        raise Poison("bad_envelope", "no 'properties.delivery_info' with exchange and routing key")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise Poison("bad_envelope", "'headers' is not an object")
    for name in ("content-type", "content-encoding"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise Poison("bad_envelope", f"'{name}' is not a string")
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        raise Poison("bad_envelope", f"'body' is a JSON {type(body).__name__}, not a string")
    encoding = properties.get("body_encoding")
    if body and encoding == "base64":
        try:
            base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise Poison("bad_envelope", "'body' is not valid base64") from None
    elif encoding not in (None, "base64"):
        raise Poison("bad_envelope", f"unknown body encoding {str(encoding)[:40]!r}")
    return payload


def raw_excerpt(item: bytes | str, mask: Callable[[bytes], bytes] | None = None) -> str:
    """The item's first :data:`MAX_RAW_BYTES` bytes, secrets masked, base64 (never decoded)."""
    raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else item
    head = raw[:MAX_RAW_BYTES]
    return base64.b64encode(mask(head) if mask else head).decode("ascii")


# Producer headers longer than this are refused (the message is dead-lettered as poison).
MAX_HEADER_CHARS = 1024
# Celery's task ids are UUIDs; a longer id is refused (it lands in key names and results).
MAX_TASK_ID_CHARS = 255
# The body's third element as Celery writes it: each key, and whether it holds a list of
# signatures (callbacks, errbacks, chain) or one signature (chord). Any other key would
# overwrite a field of the request (``id``, ``delivery_info``...) in the pool child.
EMBED_KEYS = {"callbacks": list, "errbacks": list, "chain": list, "chord": dict}


def usable_task_id(value: Any) -> bool:
    """A task id the worker can key a result or a DLQ entry by: 1-255 characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_TASK_ID_CHARS


def malformed(headers: dict[str, Any], args: Any, kwargs: Any, embed: Any = None) -> str | None:
    """What is wrong with a task message's shape, or None. Checked by the worker's parent
    before the message reaches a pool child, so garbage is dead-lettered as poison instead
    of failing inside Celery (or the pool's time-limit thread).

    ``embed`` is the body's third element (Celery's callbacks, errbacks, chain, chord):
    Celery merges it into the request with ``**embed`` and runs what it names after the
    body, so a wrong shape would lose the message or fail it after its effect."""
    if not usable_task_id(headers.get("id")):
        return f"the task id is not a string of 1-{MAX_TASK_ID_CHARS} characters"
    if not isinstance(args, list | tuple):
        return f"args is a {type(args).__name__}, not a list"
    if not isinstance(kwargs, dict):
        return f"kwargs is a {type(kwargs).__name__}, not an object"
    problem = _embed_problem(embed)
    if problem:
        return problem
    for name in PRODUCER_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return f"header {name!r} is a {type(value).__name__}, not a string"
        if len(str(value)) > MAX_HEADER_CHARS:
            return f"header {name!r} is longer than {MAX_HEADER_CHARS} characters"
    limits = headers.get("timelimit")
    if limits is not None and not _limits_valid(limits):
        return "header 'timelimit' is not [hard, soft] seconds (numbers > 0 or null)"
    return None


def _limits_valid(limits: Any) -> bool:
    return (
        isinstance(limits, list | tuple)
        and len(limits) == 2
        and all(
            x is None or (isinstance(x, int | float) and not isinstance(x, bool) and 0 < x < 1e9)
            for x in limits
        )
    )


# Writes a poison item to the DLQ: (raw item, queue, what is wrong) -> True once written.
PoisonSink = Callable[[bytes, str, Poison], bool]
_poison_sink: PoisonSink | None = None


def set_poison_sink(sink: PoisonSink | None) -> None:
    """Install the function that dead-letters poison items (the worker's consumer does)."""
    global _poison_sink
    _poison_sink = sink


def dead_letter(raw: bytes, queue: str, poison: Poison) -> bool:
    """Hand a poison item to the installed sink; True once it is written. Never raises:
    a sink that fails (or none installed) is logged, and the caller keeps the item."""
    sink = _poison_sink
    if sink is None:
        log.error("poison_without_sink", queue=queue, kind=poison.kind, size=len(raw))
        return False
    try:
        return bool(sink(raw, queue, poison))
    except Exception:
        log.exception("poison_sink_failed", queue=queue, kind=poison.kind)
        return False


def _embed_problem(embed: Any) -> str | None:
    """What is wrong with the body's embed (None or an object of :data:`EMBED_KEYS`)."""
    if embed is None:
        return None
    if not isinstance(embed, dict):
        kind = type(embed).__name__
        return f"the body's third element (callbacks, chain, ...) is a {kind}, not an object"
    for key, value in embed.items():
        shape = EMBED_KEYS.get(key) if isinstance(key, str) else None
        if shape is None:
            return f"the body's third element has an unknown key {str(key)[:40]!r}"
        if value is None:
            continue
        if shape is dict:
            if not _signature(value):
                return f"{key!r} is not a task signature (an object with a 'task' name)"
        elif not isinstance(value, list) or not all(_signature(item) for item in value):
            return f"{key!r} is not a list of task signatures (objects with a 'task' name)"
    return None


def _signature(value: Any) -> bool:
    """A Celery signature as JSON: an object with a task name, and its args, kwargs and
    options (if given) of the types Celery reads. Nested signatures (a group's tasks)
    are Celery's to read when it applies them."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("task"), str)
        and bool(value["task"])
        and isinstance(value.get("args", ()), list | tuple | None)
        and isinstance(value.get("kwargs", {}), dict | None)
        and isinstance(value.get("options", {}), dict | None)
    )


def body_shape_problem(payload: Any) -> str | None:
    """What is wrong with a decoded protocol-2 body that is not ``[args, kwargs, embed]``
    (Celery would unpack it and fail with a bare ValueError or TypeError)."""
    if isinstance(payload, list | tuple):
        if len(payload) == 3:
            return None
        return f"the body is a list of {len(payload)}, not [args, kwargs, embed]"
    return f"the body is a JSON {_json_kind(payload)}, not [args, kwargs, embed]"


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
