"""What the pipeline knows about one delivery of a task message.

A :class:`Delivery` is built once per delivery from Celery's request: the producer's
headers (DESIGN §7), the internal headers our parked copies carry, and the broker's
delivery info. The task body reaches it through :func:`current`, e.g. to send the
idempotency key, fencing number and correlation id downstream.
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from reliability import metrics
from reliability.deadline import parse_deadline
from reliability.errors import PoisonMessage
from reliability.guard import Action, Call, DeadLetter, Duplicate, Guard
from reliability.scripts import Fragment, Part

if TYPE_CHECKING:
    from reliability.admission import Verdict

log = structlog.get_logger("reliability.delivery")

# Producer contract: plain Celery apps set these with apply_async(headers=...).
IDEMPOTENCY_KEY = "idempotency_key"
CORRELATION_ID = "correlation_id"
DEADLINE = "deadline"
TENANT_ID = "tenant_id"

# Internal headers carried by the copies the service itself publishes.
DEFER_ID = "rel_defer"  # the parked entry a copy was published from
PUBLISH_ID = "rel_pub"  # which publication of that entry this copy is
FIRST_ATTEMPT_AT = "rel_first"  # epoch seconds of the first attempt (max elapsed)
PREVIOUS_DELAY = "rel_prev_delay"  # last retry delay (decorrelated jitter)
REDRIVE_COUNT = "rel_redrive"  # how many times the DLQ re-enqueued this work
RESERVED = "rel_reserved"  # this copy's rate-limit slots were reserved when it was parked

# Where ReliableRequest keeps values Celery's request dict would otherwise lose.
REQUEST_CORRELATION_ID = "rel_correlation_id"
# A nonce the worker's parent mints per delivery: the lease owner token. Delivery tags
# repeat when kombu restores a message, so they cannot tell two deliveries apart.
REQUEST_OWNER = "rel_owner"

INTERNAL_HEADERS = (DEFER_ID, PUBLISH_ID, FIRST_ATTEMPT_AT, PREVIOUS_DELAY, REDRIVE_COUNT, RESERVED)
PRODUCER_HEADERS = (IDEMPOTENCY_KEY, CORRELATION_ID, DEADLINE, TENANT_ID)


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _hex_id(value: Any) -> str | None:
    """An internal id (defer/publish ids are uuid4 hex); anything else is ignored, so a
    forged header can neither name arbitrary keys nor pass for one of our copies."""
    text = _text(value)
    if text is None or len(text) != 32 or not all(c in "0123456789abcdef" for c in text):
        return None
    return text


def _number(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _time_limits(value: Any) -> tuple[float | None, float | None] | None:
    """The producer's ``timelimit`` header (hard, soft); ``None`` when neither is set."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    hard, soft = _number(value[0]), _number(value[1])
    return None if hard is None and soft is None else (hard, soft)


@dataclass
class Delivery:
    """One delivery of one task message, as the pipeline sees it."""

    task_id: str
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retries: int = 0
    correlation_id: str = ""
    idempotency_header: str | None = None
    deadline: datetime | None = None
    deadline_header: str | None = None
    tenant_id: str | None = None
    defer_id: str | None = None
    publish_id: str | None = None
    first_attempt_at: float | None = None
    previous_delay: float | None = None
    redrive_count: int = 0
    reserved: bool = False  # its rate-limit slots were reserved when it was parked
    time_limits: tuple[float | None, float | None] | None = None  # producer's (hard, soft)
    expires: str | None = None  # producer's Celery `expires` (ISO-8601)
    delivery_tag: str = ""
    owner_nonce: str | None = None
    redelivered: bool = False
    hostname: str = ""
    routing: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    root_id: str | None = None
    # Filled in by the pipeline as it goes.
    idempotency_key: str | None = None
    fingerprint: str = ""
    fence: int = 0
    admitted_at: float | None = None  # Redis time of the admission script, if one ran
    duration: float = 0.0  # seconds the body ran (breaker slow-call accounting)

    @property
    def attempt(self) -> int:
        """1 for the first attempt; Celery's ``retries`` counts the ones before."""
        return self.retries + 1

    @property
    def owner(self) -> str:
        """The lease owner token: unique per delivery, known to the worker's parent too."""
        return self.owner_nonce or f"{self.hostname}:{self.delivery_tag}:{self.task_id}"

    @classmethod
    def from_request(cls, request: Any, name: str, args: Any, kwargs: Any) -> Delivery:
        """Build from a Celery ``Context`` (pool child) or a request dict (worker parent)."""
        get = request.get
        info = get("delivery_info") or {}
        deadline_header = _text(get(DEADLINE))
        return cls(
            task_id=str(get("id") or get("task_id") or ""),
            name=name,
            args=tuple(args or ()),
            kwargs=dict(kwargs or {}),
            retries=max(0, int(_number(get("retries")) or 0)),
            # Celery overwrites `correlation_id` with the AMQP property (the task id); the
            # request keeps the producer's header under REQUEST_CORRELATION_ID.
            # Missing: the root task's id, so every delivery, retry and child of this work
            # shares one correlation id.
            correlation_id=(
                _text(get(REQUEST_CORRELATION_ID))
                or _text(get("root_id"))
                or _text(get("id"))
                or uuid.uuid4().hex
            ),
            idempotency_header=_text(get(IDEMPOTENCY_KEY)),
            deadline=parse_deadline(deadline_header),
            deadline_header=deadline_header,
            tenant_id=_text(get(TENANT_ID)),
            defer_id=_hex_id(get(DEFER_ID)),
            publish_id=_hex_id(get(PUBLISH_ID)),
            first_attempt_at=_number(get(FIRST_ATTEMPT_AT)),
            previous_delay=_number(get(PREVIOUS_DELAY)),
            redrive_count=int(_number(get(REDRIVE_COUNT)) or 0),
            # Only a copy the mover published carries a reservation (its defer id is
            # checked at admission); the flag alone from a producer means nothing.
            reserved=bool(get(RESERVED)) and _hex_id(get(DEFER_ID)) is not None,
            time_limits=_time_limits(get("timelimit")),
            expires=_text(get("expires")),
            delivery_tag=str(info.get("delivery_tag") or ""),
            owner_nonce=_text(get(REQUEST_OWNER)),
            redelivered=bool(info.get("redelivered")),
            hostname=str(get("hostname") or ""),
            routing={
                "exchange": info.get("exchange") or "",
                "routing_key": info.get("routing_key") or "",
                "priority": info.get("priority"),
            },
            parent_id=_text(get("parent_id")),
            root_id=_text(get("root_id")),
        )

    def producer_headers(self) -> dict[str, Any]:
        """Headers a copy of this message must carry to be the same logical work."""
        headers: dict[str, Any] = {CORRELATION_ID: self.correlation_id}
        if self.idempotency_header:
            headers[IDEMPOTENCY_KEY] = self.idempotency_header
        if self.deadline_header:
            headers[DEADLINE] = self.deadline_header
        if self.tenant_id:
            headers[TENANT_ID] = self.tenant_id
        if self.redrive_count:
            headers[REDRIVE_COUNT] = self.redrive_count
        return headers

    def carried_headers(self) -> dict[str, Any]:
        """Headers a parked copy carries on: the first attempt's time and the last delay."""
        carried: dict[str, Any] = {}
        if self.first_attempt_at is not None:
            carried[FIRST_ATTEMPT_AT] = self.first_attempt_at
        if self.previous_delay is not None:
            carried[PREVIOUS_DELAY] = self.previous_delay
        return carried


_current: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "reliable_delivery", default=None
)


def current() -> Delivery | None:
    """The delivery whose body is running in this context, if any."""
    return _current.get()


def activate(delivery: Delivery | None) -> contextvars.Token[Delivery | None]:
    return _current.set(delivery)


def deactivate(token: contextvars.Token[Delivery | None]) -> None:
    _current.reset(token)


def outgoing_headers() -> dict[str, str]:
    """HTTP headers a task body sends downstream: key, fencing number, correlation id."""
    delivery = current()
    if delivery is None:
        return {}
    headers = {"X-Correlation-ID": delivery.correlation_id}
    if delivery.idempotency_key:
        headers["Idempotency-Key"] = delivery.idempotency_key
        headers["X-Fencing-Token"] = str(delivery.fence)
    return headers


# -- the redelivery guard -----------------------------------------------------------------


class RedeliveryVerdict(StrEnum):
    DUPLICATE = "duplicate"  # an earlier delivery of this message already settled it
    POISON = "poison"  # delivered more than max_redeliveries times


# KEYS dlv (the delivery record)   ARGV max (redeliveries)
REDELIVERY = Fragment(
    name="redelivery",
    libraries=("delivery",),
    keys=("dlv",),
    args=("max",),
    code="""
dlv_key = @dlv
local dv, dd = delivery_admit(@dlv, tonumber($max), dlv_ttl)
if dv == 'finished' then
  record('duplicate_delivery', dd)
  return {'duplicate', dd}
end
if dv == 'poison' then return {'poison', dd} end
""",
)


def delivery_key(call: Call) -> str:
    """The record of this delivery (task id, attempt, published copy)."""
    d = call.d
    return call.rt.store.keys.delivery(call.spec.tag, d.task_id, d.retries, d.publish_id or "0")


def delivery_ttl_ms(call: Call) -> int:
    """How long a delivery record is kept once its delivery ended (milliseconds)."""
    return int(call.rt.config.delivery_ttl_seconds * 1000)


class Redelivery(Guard):
    """Caps redeliveries of a message (a crash loop ends as poison) and skips a redelivered
    copy whose delivery already settled. Takes part only in redeliveries."""

    name = "redelivery"
    verdicts = RedeliveryVerdict

    def part(self, call: Call) -> Part | None:
        if not call.d.redelivered:
            return None
        return Part(REDELIVERY, [delivery_key(call)], [call.rt.config.max_redeliveries])

    def refused(self, call: Call, verdict: Verdict) -> Action:
        if verdict.decision == RedeliveryVerdict.DUPLICATE:
            return duplicate(call, verdict)
        reason = (
            f"redelivered {verdict.detail} times"
            f" (max redeliveries {call.rt.config.max_redeliveries})"
        )
        return DeadLetter("poison", reason, PoisonMessage)


def duplicate(call: Call, verdict: Verdict) -> Duplicate:
    """Another copy of this delivery already settled it: nothing to do (logged, counted)."""
    log.info("task_duplicate_delivery_skipped", settled_as=verdict.detail)
    metrics.OUTCOMES.labels(call.d.name, "duplicate_delivery").inc()
    metrics.DEDUPLICATED.labels(call.d.name, "duplicate_delivery").inc()
    return Duplicate()
