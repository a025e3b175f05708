"""Deferral that survives the broker: waiting messages are parked in Redis, not in workers.

Celery's countdown/ETA messages wait unacked inside a worker: on Redis they are
redelivered after the visibility timeout (a second copy runs), on RabbitMQ the channel
is closed after ``consumer_timeout``. So every wait — retry delays, re-checks of a key
in progress, breaker and limiter deferrals — parks the message in a sorted set by due
time, and one mover (the maintenance leader) republishes it when due. Each published
copy carries the parked entry's defer id and its own publish id; admission lets only
the first copy admitted (and that copy's own redeliveries) run.
"""

from __future__ import annotations

import functools
import json
import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from reliability import scripts
from reliability.delivery import DEFER_ID, PUBLISH_ID, Delivery, duplicate
from reliability.errors import PoisonMessage
from reliability.guard import Action, Call, DeadLetter, Guard
from reliability.republish import Copy, Publisher, republish
from reliability.scripts import FRAGMENTS, Fragment, Part, script
from reliability.store import Store

if TYPE_CHECKING:
    from reliability.admission import Verdict

log = structlog.get_logger("reliability.deferral")


@dataclass
class ParkedMessage:
    """Everything needed to publish the message again, as the same logical work."""

    task: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    retries: int
    headers: dict[str, Any]
    routing: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    root_id: str | None = None
    reason: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The producer's (hard, soft) time limits: a later attempt runs under them too.
    time_limits: list[float | None] | None = None
    expires: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str) -> ParkedMessage:
        return cls(**json.loads(text))

    @classmethod
    def of(
        cls,
        delivery: Delivery,
        *,
        retries: int,
        reason: str,
        extra_headers: dict[str, Any] | None = None,
    ) -> ParkedMessage:
        headers = delivery.producer_headers()
        headers.update(extra_headers or {})
        return cls(
            task=delivery.name,
            task_id=delivery.task_id,
            args=list(delivery.args),
            kwargs=dict(delivery.kwargs),
            retries=retries,
            headers=headers,
            routing={k: v for k, v in delivery.routing.items() if v not in (None, "")},
            parent_id=delivery.parent_id,
            root_id=delivery.root_id,
            reason=reason,
            time_limits=list(delivery.time_limits) if delivery.time_limits else None,
            expires=delivery.expires,
        )


# KEYS parked, parked_msgs   ARGV now, limit, claim_s
CLAIM_PARKED = scripts.compose(
    "deferral", body="return parked_claim(KEYS[1], KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))"
)


class Mover:
    """Republishes parked messages when due. Safe to run anywhere; meant for one leader."""

    def __init__(
        self, store: Store, app: Publisher, *, claim_seconds: float = 30.0, batch_size: int = 100
    ) -> None:
        self.store = store
        self.app = app
        self.claim_seconds = claim_seconds
        self.batch_size = batch_size

    def outlook(self) -> tuple[int, float | None]:
        """How many messages are parked, and when the next is due (Redis time)."""

        def read(c: Any) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            pipe.zcard(self.store.keys.parked)
            pipe.zrange(self.store.keys.parked, 0, 0, withscores=True)
            return list(pipe.execute())

        count, first = self.store.call("parked outlook", read)
        return int(count), (float(first[0][1]) if first else None)

    def move_due(self, now: float | None = None) -> int:
        """Publish every due entry (up to one batch); returns how many were published."""
        keys = self.store.keys
        flat = self.store.run(
            CLAIM_PARKED,
            [keys.parked, keys.parked_msgs],
            ["" if now is None else now, self.batch_size, self.claim_seconds],
            "claim parked",
        )
        moved = 0
        for index in range(0, len(flat), 2):
            park_id, raw = flat[index], flat[index + 1]
            try:
                message = ParkedMessage.from_json(raw)
            except (ValueError, TypeError) as exc:
                log.error("parked_message_unreadable", park_id=park_id, error=str(exc))
                continue
            self.publish(message, park_id)
            confirm = functools.partial(_confirm, keys=keys, park_id=park_id)
            self.store.call("confirm parked", confirm)
            moved += 1
        return moved

    def publish(self, message: ParkedMessage, park_id: str) -> None:
        """Publish the parked message as the same work: same task id and retry count,
        plus the entry's defer id and this publication's own id."""
        republish(
            self.app,
            Copy(
                task=message.task,
                args=message.args,
                kwargs=message.kwargs,
                headers={**message.headers, DEFER_ID: park_id, PUBLISH_ID: uuid.uuid4().hex},
                routing=message.routing,
                expires=message.expires,
                time_limits=message.time_limits,
                parent_id=message.parent_id,
                root_id=message.root_id,
                task_id=message.task_id,
                retries=message.retries,
            ),
        )


def _confirm(client: Any, keys: Any, park_id: str) -> None:
    pipe = client.pipeline(transaction=True)
    pipe.zrem(keys.parked, park_id)
    pipe.hdel(keys.parked_msgs, park_id)
    pipe.execute()


# Park a message for a later attempt (mode "retry": a retry, counted against the retry
# budget, which may refuse it) or a later look (mode "defer": no attempt spent). The
# guards' settle tails of a retried call run first.
PARK = script(
    "idempotency",
    "delivery",
    "deferral",
    "ledger",
    "budget",
    keys=("idem", "leases", "dlv", "ledger", "budget", "parked", "parked_msgs", "defer"),
    args=(
        "owner",
        "fence",
        "mode",
        "budget_window",
        "budget_ratio",
        "budget_floor",
        "park_id",
        "delay",
        "envelope",
        "dlv_ttl_ms",
        "ledger_max",
        "task_id",
        "name",
        "attempt",
        "outcome",
        "detail",
        "duration",
    ),
    body=f"""
{FRAGMENTS}
if $mode == 'retry' and @budget ~= '' then
  local window = tonumber($budget_window)
  budget_count_call(@budget, window)
  if budget_allow_retry(@budget, window, tonumber($budget_ratio), tonumber($budget_floor)) == 0 then
    return {{'refused', ''}}
  end
end
if @idem ~= '' then idem_release(@idem, @leases, $owner, $fence) end
local due = now + tonumber($delay)
park(@parked, @parked_msgs, $park_id, due, $envelope)
defer_issue(@defer, math.ceil(tonumber($delay) * 1000) + tonumber($dlv_ttl_ms))
delivery_finish(@dlv, $outcome, tonumber($dlv_ttl_ms))
ledger_add(@ledger, $ledger_max, $task_id, $name, $outcome, $attempt, $detail, $duration)
return {{'parked', string.format('%.6f', due)}}
""",
)


# -- the deferral guard -------------------------------------------------------------------


class DeferralVerdict(StrEnum):
    DUPLICATE = "duplicate"  # another published copy of this parked entry ran
    FORGED = "forged"  # a defer id no parked message issued (or issued too long ago)


# KEYS defer (the parked entry's claim)   ARGV pub (this copy's publish id)
DEFER = Fragment(
    name="deferral",
    libraries=("deferral",),
    keys=("defer",),
    args=("pub",),
    code="""
local fv, fd = defer_claim(@defer, $pub, dlv_ttl)
if fv == 'unknown' then return {'forged', ''} end
if fv then
  settle('duplicate_delivery', fd)
  return {'duplicate', fd}
end
""",
)


class Deferral(Guard):
    """A parked message runs once: of the copies the mover published from one parked
    entry, the first admitted (and its own redeliveries) runs, any other is a duplicate."""

    name = "deferral"
    verdicts = DeferralVerdict

    def part(self, call: Call) -> Part | None:
        d = call.d
        if not d.defer_id:
            return None
        return Part(
            DEFER, [call.rt.store.keys.defer(call.spec.tag, d.defer_id)], [d.publish_id or ""]
        )

    def refused(self, call: Call, verdict: Verdict) -> Action:
        if verdict.decision == DeferralVerdict.FORGED:
            return DeadLetter(
                "poison",
                "internal headers (rel_defer) name no parked message: forged, or "
                "parked longer ago than the delivery records are kept",
                PoisonMessage,
            )
        return duplicate(call, verdict)
