"""The guards are one list: a new guard is one class plus one entry in it.

A test-only guard refuses tasks whose name is on a deny list (a Redis set). Put between
the deferral and idempotency guards, it runs in that place: its check is in the one
admission script, after the earlier guards' checks and before any guard commits, so a
denied delivery takes no lease — atomically with the others, in one round trip.
"""

from __future__ import annotations

import re
from enum import StrEnum
from inspect import signature

from reliability import admission
from reliability.delivery import Delivery
from reliability.errors import PermanentError
from reliability.guard import Action, Call, DeadLetter, Guard
from reliability.pipeline import GUARDS, Pipeline
from reliability.runtime import Runtime
from reliability.scripts import Fragment, Part
from reliability.spec import build
from reliability.store import Store


class DenyVerdict(StrEnum):
    DENIED = "denied"


# KEYS list (a set of denied task names)
DENY = Fragment(
    name="deny_list",
    keys=("list",),
    code="if redis.call('SISMEMBER', @list, task_name) == 1 then return {'denied', task_name} end",
)


class DenyList(Guard):
    """Refuses (dead-letters) every delivery of a task whose name is on the list."""

    name = "deny_list"
    verdicts = DenyVerdict

    def part(self, call: Call) -> Part | None:
        return Part(DENY, [f"{call.rt.store.keys.prefix}:test:deny"], [])

    def refused(self, call: Call, verdict: admission.Verdict) -> Action:
        return DeadLetter("permanent", f"task {verdict.detail} is on the deny list", PermanentError)


# One class, one entry: between the deferral and the idempotency guards.
WITH_DENY = (*GUARDS[:2], DenyList(), *GUARDS[2:])


def charge(payment_id: str, amount: int) -> None: ...


def call_of(store: Store, task_id: str) -> Call:
    spec = build(
        "t.charge", {"idempotency_key_args": ("payment_id",)}, signature(charge), WITH_DENY
    )
    d = Delivery(
        task_id=task_id, name="t.charge", args=("p1", 5), kwargs={}, owner_nonce=f"owner-{task_id}"
    )
    call = Call(spec, Runtime(store), d)
    for guard in WITH_DENY:
        guard.prepare(call)
    return call


def test_a_new_guard_runs_in_its_place_in_the_one_admission_script(bare_store: Store) -> None:
    call = call_of(bare_store, "t1")
    parts = [p for g in WITH_DENY if (p := g.part(call))]
    source = admission.script_for(tuple(p.fragment for p in parts)).source
    checks = re.findall(r"^-- (\w+)$", source, flags=re.M)
    assert checks == ["deny_list", "idempotency"]  # a first delivery: no redelivery/deferral
    assert source.index("SISMEMBER") < source.index("fence = idem_acquire(")


def test_a_denied_delivery_is_refused_atomically_and_takes_no_lease(bare_store: Store) -> None:
    pipeline = Pipeline(call_of(bare_store, "t0").spec, Runtime(bare_store), WITH_DENY)
    calls: list[str] = []
    run = bare_store.run

    def counting(lua: str, keys: list[str], args: list[object], action: str) -> object:
        calls.append(action)
        return run(lua, keys, args, action)

    bare_store.run = counting  # type: ignore[method-assign]
    bare_store.client.sadd(f"{bare_store.keys.prefix}:test:deny", "t.charge")
    denied = call_of(bare_store, "t1")
    verdict = pipeline._admit(denied)
    assert verdict == admission.Verdict("denied", "t.charge")
    assert calls == ["admission"]  # one round trip for every guard
    assert isinstance(pipeline._owner(verdict.decision), DenyList)
    assert bare_store.client.zcard(bare_store.keys.leases) == 0  # no lease taken
    bare_store.client.srem(f"{bare_store.keys.prefix}:test:deny", "t.charge")
    admitted = pipeline._admit(call_of(bare_store, "t2"))
    assert admitted.runs and admitted.fence == 1
    assert calls == ["admission", "admission"]
