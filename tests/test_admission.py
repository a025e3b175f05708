"""The admission script: fragments assembled into one Lua call, run against real Redis.

The first half is pure (token binding, fragment order, argument counts, caching); the
second runs assembled admissions with a fixed ``now`` and checks the verdict, the keys
written and the ledger entries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pytest

from reliability import admission, idempotency, scripts
from reliability.admission import Verdict
from reliability.completion import COMPLETE
from reliability.deferral import DEFER
from reliability.delivery import REDELIVERY as DELIVERY
from reliability.idempotency_store import IdempotencyStore, Lease
from reliability.ledger import Ledger
from reliability.scripts import Fragment, Part
from reliability.store import Store

IDEM = idempotency.FRAGMENT
NOW = 1_000_000.0
LEDGER_MAX_LEN = 1000
DELIVERY_TTL_MS = 60_000
LEASE_SECONDS = 10.0
RESULT_TTL_SECONDS = 3600
# A guard that always refuses: shows what a refusal after other checks leaves behind.
REFUSE = Fragment(name="refuse", code="do return {'refused', 'always'} end")


def checks_in_order(script: str) -> list[str]:
    return re.findall(r"^-- (\w+)$", script, flags=re.M)


# -- assembly (pure) ---------------------------------------------------------------------


def test_names_bind_to_the_keys_and_arguments_after_the_fragments_before() -> None:
    script = admission.assemble((DELIVERY, DEFER, IDEM))
    # Base: KEYS[1] ledger, ARGV[1] now, ARGV[2..6] its own. Redelivery: KEYS[2], ARGV[7].
    assert "dlv_key = KEYS[2]" in script
    assert "delivery_admit(KEYS[2], tonumber(ARGV[7]), dlv_ttl)" in script
    # Deferral: KEYS[3], ARGV[8].
    assert "defer_claim(KEYS[3], ARGV[8], dlv_ttl)" in script
    # Idempotency: KEYS[4..5], ARGV[9..13].
    assert "idem_check(KEYS[4], ARGV[9])" in script
    assert (
        "fence = idem_acquire(KEYS[4], KEYS[5], ARGV[9], ARGV[10], tonumber(ARGV[11]),"
        " tonumber(ARGV[12]), task_id, ARGV[13])"
    ) in script
    assert not re.search(r"[@$][A-Za-z_]", script.split("redis.replicate_commands()")[-1])


def test_the_same_fragment_binds_differently_at_another_position() -> None:
    script = admission.assemble((IDEM,))
    assert "idem_check(KEYS[2], ARGV[7])" in script
    assert "idem_acquire(KEYS[2], KEYS[3], ARGV[7], ARGV[8], tonumber(ARGV[9])," in script


def test_checks_run_in_fragment_order_and_commits_only_after_every_check() -> None:
    script = admission.assemble((DELIVERY, DEFER, IDEM))
    assert checks_in_order(script) == ["redelivery", "deferral", "idempotency"]
    reordered = admission.assemble((IDEM, DELIVERY))
    assert checks_in_order(reordered) == ["idempotency", "redelivery"]
    last_check = reordered.index("delivery_admit(KEYS[4]")
    assert reordered.index("fence = idem_acquire(") > last_check
    assert reordered.rstrip().endswith(
        "return {'run', tostring(fence), string.format('%.6f', now), unpack(run_extra)}"
    )


def test_each_library_is_included_once() -> None:
    script = admission.assemble((DELIVERY, DEFER, IDEM))
    for function in ("delivery_admit", "ledger_add", "defer_claim", "idem_check"):
        assert script.count(f"local function {function}(") == 1
    assert script.startswith(scripts.lua("prelude"))


def test_the_script_is_cached_per_combination() -> None:
    first = admission.script_for((DELIVERY, IDEM))
    again = admission.script_for(tuple([DELIVERY, IDEM]))
    assert again is first
    copy = Fragment(
        DELIVERY.name,
        DELIVERY.libraries,
        DELIVERY.keys,
        DELIVERY.args,
        DELIVERY.code,
        DELIVERY.commit,
    )
    assert admission.script_for((copy, IDEM)) is first
    assert admission.script_for((IDEM, DELIVERY)) != first


def test_the_layout_concatenates_named_values_then_parts_in_order() -> None:
    parts = [
        Part(DELIVERY, ["dlv"], [5]),
        Part(DEFER, ["defer"], ["pub"]),
        Part(IDEM, ["idem", "leases"], ["fp", "owner", 10, 3600, "tag"]),
    ]
    script, keys, args = admission.layout(
        parts, ledger="ledger", ledger_max=9, task_id="t", name="n", attempt=1, dlv_ttl_ms=7
    )
    assert script.fragments == (DELIVERY, DEFER, IDEM)
    assert keys == ["ledger", "dlv", "defer", "idem", "leases"]
    assert args == ["", 9, "t", "n", 1, 7, 5, "pub", "fp", "owner", 10, 3600, "tag"]


@pytest.mark.parametrize(
    ("keys", "args"), [([], [5]), (["a", "b"], [5]), (["a"], []), (["a"], [5, 6])]
)
def test_a_part_with_the_wrong_number_of_keys_or_arguments_is_refused(
    keys: list[str], args: list[Any]
) -> None:
    with pytest.raises(ValueError, match="fragment redelivery: wrong number of keys/args"):
        Part(DELIVERY, keys, args)


def test_an_unknown_name_in_a_fragment_is_refused_when_the_script_is_built() -> None:
    bad = Fragment("bad", keys=("k",), code="return @nope")
    with pytest.raises(KeyError, match="fragment bad: no key named 'nope'"):
        admission.assemble((bad,))


def test_parse_reads_run_and_refusal_replies() -> None:
    verdict = admission.parse(["run", "3", "1000000.250000"])
    assert verdict == Verdict("run", fence=3, now=1_000_000.25)
    assert verdict.runs
    refused = admission.parse(["busy", "2.500000", "x"])
    assert refused == Verdict("busy", "2.500000", extra=["x"])
    assert not refused.runs
    assert admission.parse(["poison"]) == Verdict("poison", "")


# -- admissions against Redis ------------------------------------------------------------


class Admission:
    """Runs an assembled admission the way the pipeline does, with a fixed clock."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ledger = Ledger(store)

    def __call__(
        self, parts: Sequence[Part], now: float = NOW, task_id: str = "t1", attempt: int = 1
    ) -> Verdict:
        script, keys, args = admission.layout(
            parts,
            ledger=self.store.keys.ledger,
            ledger_max=LEDGER_MAX_LEN,
            task_id=task_id,
            name="test.echo",
            attempt=attempt,
            dlv_ttl_ms=DELIVERY_TTL_MS,
            now=now,
        )
        return admission.parse(self.store.run(script.source, keys, args, "admission"))

    def outcomes(self) -> list[tuple[str, str]]:
        return [(e["outcome"], e["detail"]) for e in self.ledger.entries()]

    def delivery(self, key: str, max_redeliveries: int = 2) -> Part:
        return Part(DELIVERY, [key], [max_redeliveries])

    def defer(self, defer_id: str, publish_id: str) -> Part:
        """A copy of parked entry ``defer_id`` (parking issued it: its key exists)."""
        key = self.store.keys.defer("test.echo", defer_id)
        self.store.client.set(key, "", nx=True, px=DELIVERY_TTL_MS)
        return Part(DEFER, [key], [publish_id])

    def idem(self, key: str, fp: str, owner: str) -> Part:
        return Part(
            IDEM,
            [self.store.keys.idem("test.echo", key), self.store.keys.leases],
            [fp, owner, LEASE_SECONDS, RESULT_TTL_SECONDS, "dtag-" + owner],
        )


@pytest.fixture
def admit(bare_store: Store) -> Admission:
    return Admission(bare_store)


def finish_delivery(store: Store, dlv_key: str) -> None:
    """Settle a delivery as succeeded with the completion script (no idempotency key)."""
    k = store.keys
    keys, args = COMPLETE.layout(
        {"leases": k.leases, "dlv": dlv_key, "ledger": k.ledger},
        {
            "result": "null",
            "result_ttl": RESULT_TTL_SECONDS,
            "dlv_ttl_ms": DELIVERY_TTL_MS,
            "ledger_max": LEDGER_MAX_LEN,
            "task_id": "t1",
            "name": "test.echo",
            "attempt": 1,
            "budget_window": 60,
        },
        now=NOW,
    )
    store.run(COMPLETE.source, keys, args, "completion")


def test_delivery_runs_until_it_is_delivered_more_than_max_redeliveries(
    admit: Admission, bare_store: Store
) -> None:
    dlv = bare_store.keys.delivery("test.echo", "t1", 0, "")
    verdicts = [admit([admit.delivery(dlv)]).decision for _ in range(4)]
    assert verdicts == ["run", "run", "poison", "poison"]
    assert admit([admit.delivery(dlv)]) == Verdict("poison", "5")
    assert bare_store.client.hget(dlv, "n") == "5"
    assert 0 < bare_store.client.pttl(dlv) <= DELIVERY_TTL_MS
    assert admit.outcomes() == []  # poison is dead-lettered (and recorded) by the pipeline


def test_a_finished_delivery_is_a_duplicate_even_past_max_redeliveries(
    admit: Admission, bare_store: Store
) -> None:
    dlv = bare_store.keys.delivery("test.echo", "t1", 0, "")
    assert admit([admit.delivery(dlv)]).runs
    finish_delivery(bare_store, dlv)
    for _ in range(3):
        assert admit([admit.delivery(dlv)]) == Verdict("duplicate", "succeeded")
    assert admit.outcomes() == [("succeeded", "")] + [("duplicate_delivery", "succeeded")] * 3


def test_the_first_publish_id_owns_the_defer_id_and_may_run_again(
    admit: Admission, bare_store: Store
) -> None:
    assert admit([admit.defer("d1", "pub-a")]).runs
    assert admit([admit.defer("d1", "pub-a")]).runs  # a redelivery of the same copy
    assert admit([admit.defer("d1", "pub-b")]) == Verdict("duplicate", "pub-a")
    assert admit([admit.defer("d2", "pub-b")]).runs  # another parked entry entirely
    defer_key = bare_store.keys.defer("test.echo", "d1")
    assert bare_store.client.get(defer_key) == "pub-a"
    assert 0 < bare_store.client.pttl(defer_key) <= DELIVERY_TTL_MS
    assert admit.outcomes() == [("duplicate_delivery", "pub-a")]


def test_a_duplicate_copy_settles_its_own_delivery_record(
    admit: Admission, bare_store: Store
) -> None:
    assert admit([admit.defer("d1", "pub-a")]).runs
    dlv_b = bare_store.keys.delivery("test.echo", "t1", 1, "pub-b")
    verdict = admit([admit.delivery(dlv_b), admit.defer("d1", "pub-b")])
    assert verdict == Verdict("duplicate", "pub-a")
    assert bare_store.client.hget(dlv_b, "fin") == "duplicate_delivery"
    # Its own redelivery is recognised as already settled.
    assert admit([admit.delivery(dlv_b), admit.defer("d1", "pub-b")]) == Verdict(
        "duplicate", "duplicate_delivery"
    )


def test_idempotency_takes_a_lease_then_reports_busy_and_conflict(
    admit: Admission, bare_store: Store
) -> None:
    key = bare_store.keys.idem("test.echo", "k1")
    first = admit([admit.idem("k1", "fp", "owner-1")], task_id="t1")
    assert first == Verdict("run", fence=1, now=NOW)
    state = bare_store.client.hgetall(key)
    assert state == {
        "state": "running",
        "fp": "fp",
        "owner": "owner-1",
        "fence": "1",
        "until": f"{NOW + LEASE_SECONDS:.6f}",
        "tid": "t1",
        "dtag": "dtag-owner-1",
    }
    assert bare_store.client.zscore(bare_store.keys.leases, key) == NOW + LEASE_SECONDS
    assert admit([admit.idem("k1", "fp", "owner-2")], now=NOW + 2.5) == Verdict("busy", "7.500000")
    assert admit([admit.idem("k1", "other-fp", "owner-2")], now=NOW + 2.5) == Verdict(
        "conflict", "running"
    )
    # The lease lapsed: the next delivery takes over with the next fence.
    takeover = admit([admit.idem("k1", "fp", "owner-3")], now=NOW + LEASE_SECONDS)
    assert takeover.decision == "run" and takeover.fence == 2
    assert bare_store.client.hget(key, "owner") == "owner-3"
    assert admit.outcomes() == []


def test_a_done_key_returns_its_result_and_records_skipped(
    admit: Admission, bare_store: Store
) -> None:
    key = bare_store.keys.idem("test.echo", "k1")
    verdict = admit([admit.idem("k1", "fp", "owner-1")])
    lease = Lease(key, "owner-1", verdict.fence)
    assert IdempotencyStore(bare_store).complete(
        lease, {"charged": 42}, RESULT_TTL_SECONDS, now=NOW + 1
    )
    assert bare_store.client.zscore(bare_store.keys.leases, key) is None
    dlv = bare_store.keys.delivery("test.echo", "t2", 0, "")
    skipped = admit(
        [admit.delivery(dlv), admit.idem("k1", "fp", "owner-2")], task_id="t2", now=NOW + 2
    )
    assert skipped.decision == "done"
    assert json.loads(skipped.detail) == {"charged": 42}
    assert bare_store.client.hget(dlv, "fin") == "skipped"
    assert [(e["task_id"], e["outcome"], e["at"]) for e in admit.ledger.entries()] == [
        ("t2", "skipped", f"{NOW + 2:.6f}")
    ]
    assert admit([admit.idem("k1", "other-fp", "owner-3")]) == Verdict("conflict", "done")


def test_a_refusal_in_a_later_fragment_commits_no_earlier_lease(
    admit: Admission, bare_store: Store
) -> None:
    key = bare_store.keys.idem("test.echo", "k1")
    assert admit([admit.defer("d1", "pub-a")]).runs
    refused = admit([admit.idem("k1", "fp", "owner-1"), admit.defer("d1", "pub-b")])
    assert refused == Verdict("duplicate", "pub-a")
    assert admit([admit.idem("k1", "fp", "owner-1"), Part(REFUSE)]) == Verdict("refused", "always")
    assert bare_store.client.exists(key) == 0
    assert bare_store.client.zcard(bare_store.keys.leases) == 0
    # Nothing was held, so the next delivery takes the key with the first fence.
    assert admit([admit.idem("k1", "fp", "owner-2")]) == Verdict("run", fence=1, now=NOW)


def test_a_defer_id_no_parked_message_issued_is_refused_as_forged(
    admit: Admission, bare_store: Store
) -> None:
    forged = Part(DEFER, [bare_store.keys.defer("test.echo", "f" * 32)], ["pub-x"])
    assert admit([forged]) == Verdict("forged", "")
    assert bare_store.client.exists(bare_store.keys.defer("test.echo", "f" * 32)) == 0
