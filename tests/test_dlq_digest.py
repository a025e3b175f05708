"""The ops service's DLQ summary reads each entry once per process (the dashboard asks
for it every few seconds) and still follows the DLQ exactly: new entries counted,
removed and purged ones gone."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from reliability.dlq import DeadLetter, DeadLetterQueue, Filter
from reliability.dlq_digest import digests_of
from reliability.ledger import Ledger
from reliability.redrive import refusal
from reliability.security import Masker
from reliability.store import Store
from tests.support.fleet import delete_prefix
from worker.ops import views


@pytest.fixture
def store(redis_url: str) -> Iterator[Store]:
    prefix = f"tdigest{uuid.uuid4().hex[:8]}:"
    yield Store(redis_url, prefix)
    delete_prefix(redis_url, prefix)


def entry(failure_class: str, message: str, task: str = "payments.charge") -> DeadLetter:
    return DeadLetter(
        task_name=task,
        task_id=uuid.uuid4().hex,
        failure_class=failure_class,
        exception_type="TransientError",
        exception_message=message,
    )


def test_the_summary_follows_additions_removals_and_purges(store: Store) -> None:
    dlq, ledger = DeadLetterQueue(store), Ledger(store)
    rt: Any = SimpleNamespace(store=store, masker=Masker(), dlq=DeadLetterQueue(store))
    first = [entry("transient", "answered 503"), entry("transient", "answered 502")]
    for e in first:
        dlq.add(e, ledger)
    summary = views.dlq_summary(rt)
    assert (summary["total"], summary["by_class"]) == (2, {"transient": 2})
    assert [g["count"] for g in summary["groups"]] == [2]  # numbers normalised: one kind

    parsed: list[str] = []
    original = DeadLetter.from_json

    def counting(text: str | bytes) -> DeadLetter:
        found = original(text)
        parsed.append(found.id)
        return found

    dlq.remove(first[0].id)
    later = [entry("poison", "not json", task="webhooks.deliver") for _ in range(3)]
    for e in later:
        dlq.add(e, ledger)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeadLetter, "from_json", staticmethod(counting))
        summary = views.dlq_summary(rt)
    assert sorted(parsed) == sorted(e.id for e in later)  # only the new entries were read
    assert (summary["total"], summary["by_class"]) == (4, {"poison": 3, "transient": 1})
    poison, transient = summary["groups"]
    assert (poison["count"], transient["count"], transient["newest_id"]) == (3, 1, first[1].id)
    assert poison["newest_id"] in {e.id for e in later}
    assert summary["groups"][0]["tasks"] == {"webhooks.deliver": 3}

    dlq.purge()
    summary = views.dlq_summary(rt)
    assert (summary["total"], summary["by_class"], summary["groups"]) == (0, {}, [])
    assert digests_of(rt).read(rt) == []


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not JSON (Expecting value at character 0)"),
        (b"\xff\xfe", "not JSON (Expecting value at character 0)"),  # read as U+FFFD
        (b"[1, 2]", "not a DLQ envelope (AttributeError)"),
        (b'{"task_name": "x"}', "not a DLQ envelope (TypeError)"),
        (
            b'{"task_name": 5, "task_id": "t", "failure_class": "transient"}',
            "field 'task_name' is a int",
        ),
        (
            b'{"task_name": "x", "task_id": "t", "failure_class": "transient", "args": "sk_1"}',
            "field 'args' is a str",
        ),
    ],
    ids=["not-json", "binary", "list", "missing", "int-name", "str-args"],
)
def test_an_unreadable_envelope_is_a_stand_in_that_is_shown_and_purged_never_redriven(
    store: Store, raw: bytes, problem: str
) -> None:
    """Written by hand or by another program: every reader shows it as poison, a redrive
    is refused, a purge removes it, and its bytes are never repeated."""
    dlq = DeadLetterQueue(store)
    good = entry("transient", "answered 503")
    dlq.add(good, Ledger(store))
    keys = store.keys
    store.call("test", lambda c: (c.hset(keys.dlq, "bad", raw), c.zadd(keys.dlq_index, {"bad": 1})))

    bad = dlq.get("bad")
    assert bad is not None
    assert (bad.id, bad.task_name, bad.failure_class, bad.raw_size, bad.raw_body) == (
        "bad", "", "poison", len(raw), None
    )  # fmt: skip
    assert bad.reason == f"unreadable DLQ envelope: {problem}"
    assert [e.id for e in dlq.iter()] == [good.id, "bad"]
    assert [e.id for e in dlq.page(offset=1, limit=5)] == ["bad"]
    summary = views.dlq_summary(
        SimpleNamespace(store=store, masker=Masker(), dlq=DeadLetterQueue(store))
    )  # type: ignore[arg-type]
    assert (summary["total"], summary["by_class"]) == (2, {"transient": 1, "poison": 1})
    assert summary["oldest_age_seconds"] < 60  # the good entry's age, not the stand-in's
    assert "sk_1" not in json.dumps(summary) + bad.to_json()
    assert refusal(bad, "bad", 3) == f"entry bad names no task ({bad.reason}): purge it"
    assert dlq.purge(Filter(failure_class="poison")) == 1
    assert [e.id for e in dlq.iter()] == [good.id]
