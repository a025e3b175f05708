"""The ops service's DLQ summary reads each entry once per process (the dashboard asks
for it every few seconds) and still follows the DLQ exactly: new entries counted,
removed and purged ones gone."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.fleet import delete_prefix
from worker.ops import views
from worker.ops.dlq_digest import digests_of


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
    rt: Any = SimpleNamespace(store=store)
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
