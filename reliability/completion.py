"""A successful delivery's completion record: written once, before the ack.

The completion script records the result under the idempotency key (unless a successor
took the key over: ``superseded``), finishes the delivery record, counts the call in the
retry budget, appends the ledger, and runs the guards' settle tails (the breaker hears
of the success, concurrency places are freed). When the result backend is the state
store's Redis, Celery's result write is fused into the same script
(:mod:`reliability.backend`): the pending completion travels on the task's request
context (``request.reliable_completion``) from the pipeline to the backend, or to the
task's ``on_success``/``on_failure`` when no result is stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from reliability import metrics
from reliability.delivery import delivery_key, delivery_ttl_ms
from reliability.idempotency import idem_key, result_ttl
from reliability.ledger import Outcome, ran_for
from reliability.runtime import Runtime
from reliability.scripts import FRAGMENTS, Part, Script, script

if TYPE_CHECKING:
    from reliability.guard import Call

log = structlog.get_logger("reliability.pipeline")

# Where the pending completion waits on Celery's request context.
PENDING = "reliable_completion"

_KEYS = ("idem", "leases", "dlv", "ledger", "budget")
_ARGS = (
    "owner",
    "fence",
    "result",
    "result_ttl",
    "dlv_ttl_ms",
    "ledger_max",
    "task_id",
    "name",
    "attempt",
    "budget_window",
    "duration",
)
_BODY = f"""
{FRAGMENTS}
local outcome = 'succeeded'
if @idem ~= '' and idem_complete(@idem, @leases, $owner, $fence, $result,
                                 tonumber($result_ttl)) == 0 then
  outcome = 'superseded'
end
delivery_finish(@dlv, outcome, tonumber($dlv_ttl_ms))
if @budget ~= '' then budget_count_call(@budget, tonumber($budget_window)) end
ledger_add(@ledger, $ledger_max, $task_id, $name, outcome, $attempt, '', $duration)
"""
_LIBRARIES = ("idempotency", "delivery", "ledger", "budget")

COMPLETE = script(*_LIBRARIES, keys=_KEYS, args=_ARGS, body=_BODY + "return outcome\n")

# COMPLETE plus Celery's result write in the same round trip. Like Celery's backend, an
# already stored SUCCESS is never overwritten; a superseded holder stores nothing.
COMPLETE_AND_STORE = script(
    *_LIBRARIES,
    keys=(*_KEYS, "meta"),
    args=(*_ARGS, "meta_value", "meta_expires"),
    body=_BODY
    + """
if outcome == 'succeeded' then
  local current = redis.call('GET', @meta)
  local ok, meta = pcall(cjson.decode, current or '{}')
  if not (ok and type(meta) == 'table' and meta['status'] == 'SUCCESS') then
    if tonumber($meta_expires) > 0 then
      redis.call('SETEX', @meta, $meta_expires, $meta_value)
    else
      redis.call('SET', @meta, $meta_value)
    end
    redis.call('PUBLISH', @meta, $meta_value)
  end
end
return outcome
""",
)


def result_json(result: Any) -> str:
    """The result as stored under the idempotency key (a repr when JSON cannot hold it)."""
    try:
        return json.dumps(result, default=str)
    except (TypeError, ValueError):
        return json.dumps(repr(result))


@dataclass
class Completion:
    """One delivery's completion, ready to write (alone, or fused with the result)."""

    task_name: str
    idempotency_key: str | None
    keys: Mapping[str, str]
    args: Mapping[str, Any]
    parts: Sequence[Part] = ()
    # Runs a store operation, handing the message back if the store stays away.
    store: Callable[[str, Callable[[], Any]], Any] = field(default=lambda _op, fn: fn())

    @classmethod
    def of(
        cls,
        call: Call,
        result: Any,
        parts: Sequence[Part],
        store: Callable[[str, Callable[[], Any]], Any],
    ) -> Completion:
        """The completion of a delivery whose body returned ``result``."""
        d, rt = call.d, call.rt
        keys = rt.store.keys
        return cls(
            task_name=d.name,
            idempotency_key=d.idempotency_key,
            keys={
                "idem": idem_key(call) if d.idempotency_key else "",
                "leases": keys.leases,
                "dlv": delivery_key(call),
                "ledger": keys.ledger,
                "budget": keys.budget(call.spec.tag),
            },
            args={
                "owner": d.owner,
                "fence": str(d.fence),
                "result": result_json(result),
                "result_ttl": result_ttl(call),
                "dlv_ttl_ms": delivery_ttl_ms(call),
                "ledger_max": rt.config.ledger_max_len,
                "task_id": d.task_id,
                "name": d.name,
                "attempt": d.attempt,
                "budget_window": rt.config.budget_window_seconds,
                "duration": ran_for(d.duration),
            },
            parts=parts,
            store=store,
        )

    def write(
        self,
        rt: Runtime,
        base: Script = COMPLETE,
        keys: Mapping[str, str] | None = None,
        args: Mapping[str, Any] | None = None,
    ) -> str:
        """Run the completion script (plus what ``base`` fuses into it); the outcome."""
        script_ = base.extended(tuple(p.fragment for p in self.parts))
        key_list, arg_list = script_.layout(
            {**self.keys, **(keys or {})}, {**self.args, **(args or {})}, self.parts
        )
        outcome = str(
            self.store(
                "completion", lambda: rt.store.run(script_.source, key_list, arg_list, "completion")
            )
        )
        metrics.OUTCOMES.labels(self.task_name, outcome).inc()
        if outcome == Outcome.SUPERSEDED:
            log.warning(
                "idempotency_fence_superseded",
                idempotency_key=self.idempotency_key,
                fence=self.args.get("fence"),
            )
        return outcome


def take(request: Any) -> Completion | None:
    """The completion pending on this request context (and no longer pending)."""
    completion = getattr(request, PENDING, None)
    if completion is not None:
        setattr(request, PENDING, None)
    return completion if isinstance(completion, Completion) else None
