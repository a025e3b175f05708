"""Idempotency: one effect per key, fleet-wide.

A key is in one of three states in Redis (see ``lua/idempotency.lua``): *running* under
a lease with an owner token and a fencing number, *done* with its stored result, or
*released* after a failure so a retry may run. Inside tasks the check and the lease are
part of the admission script (the :class:`Idempotency` guard). The same state machine
for plain code is :mod:`reliability.idempotency_store` (:func:`~reliability.idempotent.idempotent`,
:class:`~reliability.effects.SideEffectWrapper` are built on it); keys by task or
function name (seed 000, 002) are in :mod:`reliability.idempotency_keys`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from reliability import metrics, scripts
from reliability.errors import IdempotencyConflict
from reliability.guard import Action, Call, DeadLetter, Guard, Park, Skip, require
from reliability.lease import Holding, Lease
from reliability.scripts import Fragment, Part
from reliability.security import key_token

if TYPE_CHECKING:
    from reliability.admission import Verdict

log = structlog.get_logger("reliability.idempotency")


def canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, so equal arguments hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(arguments: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(arguments).encode()).hexdigest()


def bind_arguments(
    signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Arguments by parameter name, so positional and keyword calls key alike."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {"args": list(args), "kwargs": dict(kwargs)}
    bound.apply_defaults()
    return dict(bound.arguments)


def derive_key(
    name: str,
    arguments: Mapping[str, Any],
    header: str | None = None,
    key_args: Sequence[str] = (),
    fp: str | None = None,
) -> str:
    """The idempotency key: the producer's header, else declared arguments, else a hash.

    Keys are namespaced by task name, so two tasks never share one by accident, and are
    deterministic: the same arguments always give the same key. A key is part of a Redis
    key name (and logged, and sent downstream as ``Idempotency-Key``), so it never
    embeds argument values: ``name:args:<sha256>`` hashes the declared arguments (each
    as text, so ``1`` and ``"1"`` key alike, as a producer's id may arrive either way),
    ``name:sha256:<fp>`` all of them. A producer's header stays readable when short and
    of a safe charset (``name:order-42``), else ``name:sha256=<hex>``. ``fp`` is the
    arguments' fingerprint when the caller has it already.
    """
    if header:
        return f"{name}:{key_token(header)}"
    if key_args:
        text = ",".join(f"{a}={arguments.get(a)}" for a in key_args)
        return f"{name}:args:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"
    return f"{name}:sha256:{fp or fingerprint(arguments)}"


# KEYS idem, leases   ARGV now, owner, fence ('' = any fence of this owner)
RELEASE = scripts.compose(
    "idempotency", body="return idem_release(KEYS[1], KEYS[2], ARGV[2], ARGV[3])"
)
# KEYS idem, leases   ARGV now, owner, fence, lease_s
RENEW = scripts.compose(
    "idempotency", body="return idem_renew(KEYS[1], KEYS[2], ARGV[2], ARGV[3], tonumber(ARGV[4]))"
)


# -- the idempotency guard ----------------------------------------------------------------


class IdempotencyVerdict(StrEnum):
    DONE = "done"  # completed: the stored result is returned, the body does not run
    BUSY = "busy"  # running elsewhere under a live lease: look again soon
    CONFLICT = "conflict"  # the same key with different arguments


# KEYS idem, leases   ARGV fp, owner, lease seconds, result ttl seconds, delivery tag
FRAGMENT = Fragment(
    name="idempotency",
    libraries=("idempotency",),
    keys=("idem", "leases"),
    args=("fp", "owner", "lease_s", "ttl_s", "dtag"),
    code="""
local iv, idd = idem_check(@idem, $fp)
if iv == 'done' then
  settle('skipped', '')
  return {'done', idd}
end
if iv then return {iv, idd} end
""",
    commit="fence = idem_acquire(@idem, @leases, $fp, $owner, tonumber($lease_s), "
    "tonumber($ttl_s), task_id, $dtag)",
)


def keyed(options: Mapping[str, Any]) -> bool:
    return bool(options.get("idempotent") or options.get("idempotency_key_args"))


def idem_key(call: Call) -> str:
    """The Redis key of the delivery's idempotency key."""
    return call.rt.store.keys.idem(call.spec.tag, call.d.idempotency_key or "")


def lease_seconds(call: Call) -> float:
    return float(call.spec.option("lease_ttl") or call.rt.config.lease_seconds)


def result_ttl(call: Call) -> int:
    return int(call.spec.option("idempotency_ttl") or call.rt.config.result_ttl_seconds)


class Idempotency(Guard):
    """One effect per key: a completed key returns its stored result, a key in progress
    under a live lease waits, otherwise the delivery takes a lease (owner, fence)."""

    name = "idempotency"
    verdicts = IdempotencyVerdict
    options = {
        "idempotent": "idempotency: key every call (from the header, key args or all args)",
        "idempotency_key_args": "idempotency: argument names that form the key",
        "idempotency_ttl": "idempotency: seconds a completed key is remembered",
        "lease_ttl": "idempotency: seconds a lease lives without renewal",
    }

    def check(self, task: str, values: Mapping[str, Any], signature: inspect.Signature) -> None:
        key_args = values.get("idempotency_key_args") or ()
        require(
            not isinstance(key_args, str),
            task,
            "idempotency_key_args must be a sequence of argument names",
        )
        missing = [a for a in key_args if a not in signature.parameters]
        require(not missing, task, f"idempotency_key_args {missing} are not parameters of the task")

    def prepare(self, call: Call) -> None:
        """Key the delivery: the producer's header, else the declared arguments."""
        d = call.d
        if keyed(call.spec.options) or d.idempotency_header:
            arguments = call.arguments()
            d.fingerprint = fingerprint(arguments)
            d.idempotency_key = derive_key(
                d.name,
                arguments,
                d.idempotency_header,
                call.spec.option("idempotency_key_args", ()),
                fp=d.fingerprint,
            )

    def part(self, call: Call) -> Part | None:
        d = call.d
        if not d.idempotency_key:
            return None
        return Part(
            FRAGMENT,
            [idem_key(call), call.rt.store.keys.leases],
            [d.fingerprint, d.owner, lease_seconds(call), result_ttl(call), d.delivery_tag],
        )

    def admitted(self, call: Call, verdict: Verdict) -> None:
        if call.d.idempotency_key:
            log.debug(
                "idempotency_lock_acquired",
                idempotency_key=call.d.idempotency_key,
                fence=verdict.fence,
            )

    def refused(self, call: Call, verdict: Verdict) -> Action:
        d = call.d
        if verdict.decision == IdempotencyVerdict.DONE:
            log.info("task_skipped_idempotent", idempotency_key=d.idempotency_key)
            metrics.OUTCOMES.labels(d.name, "skipped").inc()
            metrics.DEDUPLICATED.labels(d.name, "completed_key").inc()
            return Skip(json.loads(verdict.detail) if verdict.detail else None)
        if verdict.decision == IdempotencyVerdict.BUSY:
            delay = min(call.rt.config.recheck_seconds, max(float(verdict.detail), 0.05))
            log.info(
                "task_deferred_in_progress",
                idempotency_key=d.idempotency_key,
                recheck_in=round(delay, 3),
            )
            return Park(delay, "in_progress", reserved=d.reserved)
        reason = f"idempotency key {d.idempotency_key} holds different arguments"
        return DeadLetter("conflict", reason, IdempotencyConflict)

    def hold(self, call: Call, holding: Holding) -> None:
        if call.d.idempotency_key:
            seconds = lease_seconds(call)
            holding.leases.append(
                Lease(
                    RENEW,
                    [idem_key(call), call.rt.store.keys.leases],
                    ["", holding.owner, "", seconds],
                    seconds,
                    lost="idempotency_lease_lost",
                )
            )
