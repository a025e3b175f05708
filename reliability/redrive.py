"""One redrive of a DLQ entry: claimed, published, then removed and recorded.

:meth:`DeadLetterQueue.redrive <reliability.dlq.DeadLetterQueue.redrive>` is the one
redrive path (the operator's ``reliable dlq retry`` and the reprocessing job alike):

1. **Claim** the entry (``SET NX`` with a TTL on ``P:dlq:claim:<id>``, only while the
   entry exists, one script): two redrives racing for one entry never both publish.
2. **Publish** the entry's work again (:func:`redriven`, :mod:`reliability.republish`).
   A failed publish releases the claim and keeps the entry.
3. **Confirm** (one script): the entry leaves the DLQ, the redrive is appended to the
   work's audit trail (time, entry id, new task id, who) and the outcome ledger gets a
   ``redriven`` record (task = the entry's task, detail ``dlq <entry id>``).

The audit trail follows the work, not one entry: a redriven task that fails again is a
new entry (new task id), and its trail is found under its task id (``P:dlq:redrives``,
a hash by new task id, bounded like the DLQ). A reprocessor that dies between publish
and confirm leaves its claim to lapse (``claim_seconds``); the entry is then redriven
again, and the idempotency key it carries keeps that from becoming a second effect.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from reliability.delivery import CORRELATION_ID, PRODUCER_HEADERS, REDRIVE_COUNT
from reliability.errors import RedriveRefused
from reliability.republish import Copy
from reliability.scripts import script
from reliability.security import key_token
from reliability.store import Store

if TYPE_CHECKING:
    from reliability.dlq import DeadLetter

# A claim lapses after this many seconds (a redrive that died between claim and confirm).
DEFAULT_CLAIM_SECONDS = 60.0

CLAIM = script(
    keys=("dlq", "claim"),
    args=("entry_id", "token", "ms"),
    body="""
if redis.call('HEXISTS', @dlq, $entry_id) == 0 then return 'gone' end
if redis.call('SET', @claim, $token, 'NX', 'PX', $ms) then return 'ok' end
return 'busy'
""",
)

RELEASE = script(
    keys=("claim",),
    args=("token",),
    body="""
if redis.call('GET', @claim) == $token then return redis.call('DEL', @claim) end
return 0
""",
)

# The publish happened: it is recorded whatever became of the claim. Returns 1 when the
# claim was still this redrive's, 0 when it had lapsed (logged by the caller).
CONFIRM = script(
    "ledger",
    keys=("dlq", "dlq_index", "claim", "audit", "audit_index", "ledger"),
    args=(
        "entry_id",
        "token",
        "old_task_id",
        "new_task_id",
        "record",
        "audit_max",
        "ledger_max",
        "name",
        "attempt",
    ),
    body="""
local ours = redis.call('GET', @claim) == $token
if ours then redis.call('DEL', @claim) end
redis.call('HDEL', @dlq, $entry_id)
redis.call('ZREM', @dlq_index, $entry_id)
local rec = '{"at":' .. string.format('%.6f', now) .. ',' .. string.sub($record, 2)
local prev = redis.call('HGET', @audit, $old_task_id)
local trail = '[' .. rec .. ']'
if prev then trail = string.sub(prev, 1, -2) .. ',' .. rec .. ']' end
redis.call('HSET', @audit, $new_task_id, trail)
redis.call('ZADD', @audit_index, now, $new_task_id)
local over = redis.call('ZCARD', @audit_index) - tonumber($audit_max)
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', @audit_index, 0, over - 1)) do
    redis.call('HDEL', @audit, old)
  end
  redis.call('ZREMRANGEBYRANK', @audit_index, 0, over - 1)
end
ledger_add(@ledger, $ledger_max, $old_task_id, $name, 'redriven', $attempt, 'dlq ' .. $entry_id)
return ours and 1 or 0
""",
)


class Redrives:
    """Claims, confirmations and audit trails of DLQ redrives (see the module docstring)."""

    def __init__(self, store: Store, *, ledger_max_len: int, audit_max: int) -> None:
        self.store = store
        self.ledger_max_len = ledger_max_len
        self.audit_max = audit_max
        prefix = store.keys.prefix
        self.audit = f"{prefix}:dlq:redrives"
        self.audit_index = f"{prefix}:dlq:redrives:index"

    def claim_key(self, entry_id: str) -> str:
        return f"{self.store.keys.prefix}:dlq:claim:{key_token(entry_id)}"

    def claim(self, entry_id: str, seconds: float = DEFAULT_CLAIM_SECONDS) -> str:
        """A claim token; :class:`RedriveRefused` when the entry is gone or another
        redrive holds it."""
        token = uuid.uuid4().hex
        keys, args = CLAIM.layout(
            {"dlq": self.store.keys.dlq, "claim": self.claim_key(entry_id)},
            {"entry_id": entry_id, "token": token, "ms": max(1, int(seconds * 1000))},
        )
        verdict = self.store.run(CLAIM.source, keys, args, "dlq claim")
        if verdict == "gone":
            raise RedriveRefused(f"no DLQ entry {entry_id}")
        if verdict != "ok":
            raise RedriveRefused(f"entry {entry_id} is being redriven by another process")
        return token

    def release(self, entry_id: str, token: str) -> None:
        """Give a claim back (the publish failed): the entry stays for a later redrive."""
        keys, args = RELEASE.layout({"claim": self.claim_key(entry_id)}, {"token": token})
        self.store.run(RELEASE.source, keys, args, "dlq release")

    def confirm(self, entry: DeadLetter, token: str, new_task_id: str, by: str) -> bool:
        """Remove the published entry and record the redrive; False if the claim had lapsed."""
        record = {
            "entry_id": entry.id,
            "from_task_id": entry.task_id,
            "task_id": new_task_id,
            "redrive": entry.redrive_count + 1,
            "by": by,
        }
        keys = self.store.keys
        key_list, arg_list = CONFIRM.layout(
            {
                "dlq": keys.dlq,
                "dlq_index": keys.dlq_index,
                "claim": self.claim_key(entry.id),
                "audit": self.audit,
                "audit_index": self.audit_index,
                "ledger": keys.ledger,
            },
            {
                "entry_id": entry.id,
                "token": token,
                "old_task_id": entry.task_id,
                "new_task_id": new_task_id,
                "record": json.dumps(record, separators=(",", ":")),
                "audit_max": self.audit_max,
                "ledger_max": self.ledger_max_len,
                "name": entry.task_name,
                "attempt": entry.attempts,
            },
        )
        return bool(self.store.run(CONFIRM.source, key_list, arg_list, "dlq confirm"))

    def trail(self, task_id: str) -> list[dict[str, Any]]:
        """The redrives that led to the task ``task_id`` (oldest first; [] if none)."""
        raw = self.store.call("dlq trail", lambda c: c.hget(self.audit, task_id))
        found: list[dict[str, Any]] = json.loads(raw) if raw else []
        return found


def refusal(entry: DeadLetter | None, entry_id: str, max_redrives: int) -> str | None:
    """Why ``entry`` may not be redriven, or None when it may."""
    if entry is None:
        return f"no DLQ entry {entry_id}"
    if not entry.task_name:
        return f"entry {entry_id} names no task ({entry.reason}): purge it"
    if entry.masked_args:
        return (
            f"entry {entry_id} keeps {', '.join(entry.masked_args)} masked (secrets never reach"
            " the DLQ): redriving would run the work with *** in their place; the producer"
            " must send it again"
        )
    if entry.redrive_count >= max_redrives:
        return f"entry {entry_id} was redriven {entry.redrive_count} times (max {max_redrives})"
    return None


def redriven(entry: DeadLetter) -> Copy:
    """The copy a redrive publishes: the entry's work as a new task (new id, attempt 1).

    The producer's headers carry its idempotency key as sent (a derived key is derived
    again from the same arguments), so the redriven task keys the same; of our internal
    headers only the redrive count applies (a redrive is no parked copy nor a retry).
    """
    headers = {k: v for k, v in entry.headers.items() if k in PRODUCER_HEADERS}
    if entry.correlation_id:
        headers[CORRELATION_ID] = entry.correlation_id
    headers[REDRIVE_COUNT] = entry.redrive_count + 1
    return Copy(
        task=entry.task_name,
        args=entry.args,
        kwargs=entry.kwargs,
        headers=headers,
        routing=entry.routing,
        expires=entry.expires,
        time_limits=entry.time_limits,
        parent_id=entry.parent_id,
        root_id=entry.root_id,
    )
