"""The metrics cardinality guard (seed 004): label names at definition, values at use."""

from __future__ import annotations

import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter

from reliability import metrics
from reliability.cardinality import (
    OVERFLOW,
    CardinalityError,
    CardinalityGuard,
    Labelled,
    forbidden_name,
    unbounded_value,
)


@pytest.mark.parametrize(
    "label",
    [
        "job_id",
        "order_id",
        "user_id",
        "request_id",
        "task_id",
        "message_uuid",
        "trace_guid",
        "timestamp",
        "created_timestamp",
        "idempotency_key",
        "id",
    ],
)
def test_unbounded_label_names_are_forbidden(label: str) -> None:
    assert forbidden_name(label)


@pytest.mark.parametrize("label", ["name", "queue_name", "outcome", "failure_class", "breaker"])
def test_bounded_label_names_pass(label: str) -> None:
    assert not forbidden_name(label)


@pytest.mark.parametrize(
    "value",
    [
        "0b7e4a52-9a4f-4c0e-8d1c-2f6f3b1a9e10",
        "5f2b8c1d9e0a7f3b6c4d",
        "1796433701",
        "1796433701123",
        "2026-12-05T01:21:42Z",
        "run at 2026-12-05 01:21",
    ],
)
def test_id_and_timestamp_values_are_unbounded(value: str) -> None:
    assert unbounded_value(value)


@pytest.mark.parametrize(
    "value", ["payments.charge", "succeeded", "breaker_open", "test.call", "42"]
)
def test_ordinary_values_pass(value: str) -> None:
    assert not unbounded_value(value)


def family(guard: CardinalityGuard, labels: list[str]) -> Labelled[Counter]:
    guard.check_names("t_things_total", labels)
    metric = Counter("t_things_total", "Things.", labels, registry=CollectorRegistry())
    return Labelled(metric, "t_things_total", guard)


def test_strict_mode_raises_on_a_forbidden_name_and_an_id_value() -> None:
    guard = CardinalityGuard("strict", max_values=10)
    with pytest.raises(CardinalityError, match="job_id"):
        guard.check_names("t_jobs_total", ["name", "job_id"])
    things = family(guard, ["name"])
    with pytest.raises(CardinalityError, match="looks like an id"):
        things.labels("0b7e4a52-9a4f-4c0e-8d1c-2f6f3b1a9e10")
    with pytest.raises(CardinalityError, match="looks like an id"):
        things.labels("2026-12-05T01:21:42")


def test_strict_mode_raises_past_the_cap_of_label_sets() -> None:
    guard = CardinalityGuard("strict", max_values=3)
    things = family(guard, ["name"])
    for value in ("a", "b", "c"):
        things.labels(value).inc()
    things.labels("a").inc()  # a known set: no new check
    with pytest.raises(CardinalityError, match="more than 3 label sets"):
        things.labels("d")


def test_warning_mode_logs_once_and_records_under_other() -> None:
    guard = CardinalityGuard("warning", max_values=2)
    with structlog.testing.capture_logs() as logs:
        assert guard.check_names("t_jobs_total", ["job_id"]) is False
        assert guard.check_names("t_jobs_total", ["job_id"]) is False
        things = family(guard, ["name"])
        things.labels("0b7e4a52-9a4f-4c0e-8d1c-2f6f3b1a9e10").inc()
        things.labels("1796433701").inc()
        things.labels("a").inc()
        things.labels("b").inc()  # third label set: past the cap
        things.labels("c").inc()
    refused = [e for e in logs if e["event"] == "metric_cardinality_refused"]
    assert [(e["family"], e["problem"].split()[0]) for e in refused] == [
        ("t_jobs_total", "label"),
        ("t_things_total", "a"),
        ("t_things_total", "more"),
    ]
    assert all("0b7e4a52" not in str(e) for e in logs)  # the value itself is never logged
    values = {
        s.labels["name"]: s.value
        for s in things.metric.collect()[0].samples
        if s.name.endswith("_total")
    }
    assert values == {OVERFLOW: 4.0, "a": 1.0}


def test_every_family_of_the_service_passes_the_strict_guard() -> None:
    guard = CardinalityGuard("strict")
    for found in metrics.families():
        if isinstance(found, Labelled):
            guard.check_names(found.name, found.metric._labelnames)
            assert found.name.startswith("reliable_")
        else:
            assert found._name.startswith("reliable_")
        kind = found.metric._type if isinstance(found, Labelled) else found._type
        if kind == "gauge":
            metric = found.metric if isinstance(found, Labelled) else found
            assert metric._multiprocess_mode  # every gauge says how processes combine
