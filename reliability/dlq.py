"""The dead-letter queue: failed work kept with everything needed to understand and redo it.

Entries live in Redis (a hash of JSON envelopes plus an index by failure time), written
in the same script that settles the delivery and records the ledger outcome. The size
is bounded by policy (``max_entries``; the oldest are evicted, logged and counted).
Redrive (:mod:`reliability.redrive`) claims the entry, re-enqueues the same logical
work (:mod:`reliability.republish`) under a new task id, removes the entry only after
the publish succeeded and records it (audit trail, ledger); it is capped per entry.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import redis
import structlog

from reliability import metrics
from reliability.errors import RedriveRefused
from reliability.fingerprint import fingerprint, label
from reliability.redrive import DEFAULT_CLAIM_SECONDS, Redrives, redriven, refusal
from reliability.republish import Publisher, republish
from reliability.scripts import FRAGMENTS, script
from reliability.store import Store

T = TypeVar("T")
log = structlog.get_logger("reliability.dlq")


class FailureClass(StrEnum):
    TRANSIENT = "transient"  # retryable, but attempts (or max elapsed time) ran out
    PERMANENT = "permanent"  # retrying cannot help (4xx, give-up-on errors)
    EXPIRED = "expired"  # past its deadline or Celery `expires`
    POISON = "poison"  # invalid, undecodable, unknown task, redelivered too often
    CONFLICT = "conflict"  # same idempotency key, different arguments
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"  # fleet-wide retry budget refused


# KEYS idem (or ''), leases, dlv, ledger, budget (or ''), dlq, dlq_index
# ARGV owner (or ''), fence, budget window, entry id, envelope, max entries, dlv ttl (ms),
#      ledger max, task id, name, attempt, failure class, duration (or '': not run)
DEAD_LETTER = script(
    "idempotency",
    "delivery",
    "dlq",
    "ledger",
    "budget",
    keys=("idem", "leases", "dlv", "ledger", "budget", "dlq", "dlq_index"),
    args=(
        "owner",
        "fence",
        "budget_window",
        "entry_id",
        "envelope",
        "max_entries",
        "dlv_ttl_ms",
        "ledger_max",
        "task_id",
        "name",
        "attempt",
        "failure_class",
        "duration",
    ),
    body=f"""
{FRAGMENTS}
if @idem ~= '' and $owner ~= '' then idem_release(@idem, @leases, $owner, $fence) end
if @budget ~= '' then budget_count_call(@budget, tonumber($budget_window)) end
local evicted = dlq_add(@dlq, @dlq_index, $entry_id, $envelope, $max_entries)
if @dlv ~= '' then delivery_finish(@dlv, 'dead_lettered', tonumber($dlv_ttl_ms)) end
ledger_add(@ledger, $ledger_max, $task_id, $name, 'dead_lettered', $attempt, $failure_class,
  $duration)
return evicted
""",
)


@dataclass
class DeadLetter:
    """One DLQ envelope. Secrets are masked before it is built (see the pipeline)."""

    task_name: str
    task_id: str
    failure_class: str
    reason: str = ""
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    correlation_id: str | None = None
    tenant_id: str | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    traceback: str | None = None
    attempts: int = 1
    first_failure_at: float = field(default_factory=time.time)
    last_failure_at: float = field(default_factory=time.time)
    worker_host: str = field(default_factory=socket.gethostname)
    redrive_count: int = 0
    headers: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)  # exchange, routing_key, priority
    # What else a redrive needs to publish the same work (reliability.republish): Celery's
    # `expires` (ISO-8601), the producer's (hard, soft) time limits, the workflow ids.
    expires: str | None = None
    time_limits: list[float | None] | None = None
    parent_id: str | None = None
    root_id: str | None = None
    raw_body: str | None = None  # for messages that could not be decoded (base64, capped)
    # Bytes of such a body, kept or not: a task declaring sensitive_args keeps none (its
    # secrets cannot be found, so masked, in bytes that do not decode).
    raw_size: int | None = None
    # Arguments kept masked (sensitive, or holding a secret): their values are gone, so
    # the entry cannot be redriven; the producer sends such work again.
    masked_args: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def fingerprint(self) -> str:
        """The failure's kind (:mod:`reliability.fingerprint`): exception type (else the
        failure class: a poison message raised nothing) + message (else the reason)."""
        return fingerprint(*self.kind_and_text())

    @property
    def label(self) -> str:
        """The text the fingerprint stands for, for people."""
        return label(*self.kind_and_text())

    def masked_label(self, mask: Callable[[str], str]) -> str:
        """:attr:`label` with secrets masked: the text is masked before the label
        normalises it, since digits becoming ``<n>`` would hide a secret from the masker
        without hiding it from a reader."""
        kind, text = self.kind_and_text()
        return mask(label(kind, mask(text)))

    def kind_and_text(self) -> tuple[str, str]:
        """What the fingerprint is made of: the exception type, else the failure class (a
        poison message raised nothing); the exception message, else the reason."""
        return self.exception_type or self.failure_class, self.exception_message or self.reason

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, entry_id: str, raw: str | bytes) -> DeadLetter:
        """The entry stored under ``entry_id``. An envelope that does not parse or has
        fields of the wrong type (written by hand, by another program, or damaged) becomes
        a stand-in, so one bad envelope never breaks a listing, a report or the
        reprocessor: it is shown and can be purged, never redriven (it names no task).
        The stand-in keeps the size, never the bytes (they may hold a secret)."""
        try:
            entry = cls.from_json(raw)
            problem = _type_problem(entry)
        except json.JSONDecodeError as exc:  # its text says where, never what
            problem = f"not JSON ({exc.msg} at character {exc.pos})"
        except Exception as exc:  # valid JSON of another shape: a list, a number, ...
            problem = f"not a DLQ envelope ({type(exc).__name__})"
        if problem is None:
            entry.id = entry_id
            return entry
        return cls(
            task_name="",
            task_id="",
            failure_class="poison",
            reason=f"{UNREADABLE}: {problem}",
            exception_type="UnreadableEnvelope",
            exception_message=problem,
            first_failure_at=0.0,
            last_failure_at=0.0,
            worker_host="",
            raw_size=len(raw),
            id=entry_id,
        )


UNREADABLE = "unreadable DLQ envelope"

# The fields a reader relies on, and the types it relies on them having.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "task_name": str,
    "task_id": str,
    "failure_class": str,
    "reason": str,
    "args": list,
    "kwargs": dict,
    "attempts": int,
    "first_failure_at": (int, float),
    "last_failure_at": (int, float),
    "redrive_count": int,
    "headers": dict,
    "routing": dict,
    "masked_args": list,
}


def _type_problem(entry: DeadLetter) -> str | None:
    """The first field whose value has a type readers do not expect (never the value)."""
    for name, kind in _FIELD_TYPES.items():
        value = getattr(entry, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"field {name!r} is a {type(value).__name__}"
    return None


@dataclass
class Filter:
    """Which entries a list, redrive or purge applies to."""

    failure_class: str | None = None
    task_name: str | None = None
    since: float | None = None
    until: float | None = None
    fingerprint: str | None = None

    @property
    def everything(self) -> bool:
        """True when no condition is set: every entry matches."""
        return all(
            v is None
            for v in (self.failure_class, self.task_name, self.since, self.until, self.fingerprint)
        )

    def matches(self, entry: DeadLetter) -> bool:
        return (
            (self.failure_class is None or entry.failure_class == self.failure_class)
            and (self.fingerprint is None or entry.fingerprint == self.fingerprint)
            and (self.task_name is None or entry.task_name == self.task_name)
            and (self.since is None or entry.last_failure_at >= self.since)
            and (self.until is None or entry.last_failure_at <= self.until)
        )


# A read through the store's client (see Store.call).
Read = Callable[[redis.Redis], T]


class DeadLetterQueue:
    """Read and administer the DLQ (writes happen in the settle scripts)."""

    def __init__(
        self,
        store: Store,
        *,
        max_entries: int = 100_000,
        max_redrives: int = 3,
        ledger_max_len: int = 1_000_000,
    ) -> None:
        self.store = store
        self.max_entries = max_entries
        self.max_redrives = max_redrives
        self.redrives = Redrives(store, ledger_max_len=ledger_max_len, audit_max=max_entries)

    def add(self, entry: DeadLetter, ledger: Any, attempt: int = 1) -> int:
        """Write an entry for work that never reached a task; returns evictions."""
        keys = self.store.keys
        key_list, arg_list = DEAD_LETTER.layout(
            {
                "leases": keys.leases,
                "ledger": keys.ledger,
                "dlq": keys.dlq,
                "dlq_index": keys.dlq_index,
            },
            {
                "fence": "",
                "budget_window": 1,
                "entry_id": entry.id,
                "envelope": entry.to_json(),
                "max_entries": self.max_entries,
                "dlv_ttl_ms": 1,
                "ledger_max": ledger.max_len,
                "task_id": entry.task_id,
                "name": entry.task_name,
                "attempt": attempt,
                "failure_class": entry.failure_class,
            },
        )
        return int(self.store.run(DEAD_LETTER.source, key_list, arg_list, "dead_letter"))

    def count(self) -> int:
        return int(self.store.call("dlq count", lambda c: c.zcard(self.store.keys.dlq_index)))

    def get(self, entry_id: str) -> DeadLetter | None:
        raw = self.store.call("dlq get", lambda c: c.hget(self.store.keys.dlq, entry_id))
        return DeadLetter.read(entry_id, raw) if raw else None

    def iter(
        self, where: Filter | None = None, *, newest_first: bool = True, batch: int = 500
    ) -> Iterator[DeadLetter]:
        where = where or Filter()
        start = 0
        while True:
            ids = self.store.call("dlq list", self._ids(start, batch, newest_first))
            if not ids:
                return
            yield from (entry for entry in self.read(ids) if where.matches(entry))
            start += batch

    def ids(self, *, newest_first: bool = True) -> list[str]:
        """Every entry's id, in one read of the index: a fixed list to walk while entries
        are removed (a paged read would shift)."""
        return list(self.store.call("dlq ids", self._ids(0, 0, newest_first)))

    def read(self, ids: list[str]) -> list[DeadLetter]:
        """The entries of ``ids`` in order, in one read (ids removed meanwhile left out)."""
        raws = self.store.call("dlq read", self._raws(ids)) if ids else []
        return [DeadLetter.read(i, raw) for i, raw in zip(ids, raws, strict=True) if raw]

    # Replies are text: the store's client decodes responses.
    def _ids(self, start: int, batch: int, newest_first: bool) -> Read[list[Any]]:
        """One batch of entry ids from the index, from position ``start`` (batch 0: all)."""
        index = self.store.keys.dlq_index
        return lambda c: list(c.zrange(index, start, start + batch - 1, desc=newest_first))

    def _raws(self, ids: list[Any]) -> Read[list[Any]]:
        """The JSON envelopes of ``ids`` (None where one was removed meanwhile)."""
        return lambda c: list(c.hmget(self.store.keys.dlq, ids))

    def page(
        self, where: Filter | None = None, *, offset: int = 0, limit: int = 50
    ) -> list[DeadLetter]:
        """Matching entries ``offset`` to ``offset + limit``, newest first.

        Without a filter the page is read straight from the index (one ``ZRANGE`` of
        ``limit`` ids, whatever the offset); with one, entries are scanned in batches up
        to the page's end."""
        if where is None or where.everything:
            return self.read(self.store.call("dlq page", self._ids(offset, limit, True)))
        out: list[DeadLetter] = []
        for index, entry in enumerate(self.iter(where)):
            if index >= offset + limit:
                break
            if index >= offset:
                out.append(entry)
        return out

    def remove(self, entry_id: str) -> bool:
        keys = self.store.keys

        def _remove(c: Any) -> bool:
            pipe = c.pipeline(transaction=True)
            pipe.hdel(keys.dlq, entry_id)
            pipe.zrem(keys.dlq_index, entry_id)
            return bool(pipe.execute()[0])

        return self.store.call("dlq remove", _remove)

    def redrive(
        self,
        entry_id: str,
        app: Publisher,
        by: str = "operator",
        claim_seconds: float = DEFAULT_CLAIM_SECONDS,
    ) -> str:
        """Re-enqueue one entry through ``app``; returns the new task id. The entry is
        claimed first, removed only after the publish returned, and the redrive recorded
        by ``by`` (audit trail, outcome ledger): :mod:`reliability.redrive`."""
        token = self.redrives.claim(entry_id, claim_seconds)  # or RedriveRefused
        try:
            entry = self.get(entry_id)
            why = refusal(entry, entry_id, self.max_redrives)
            if why is not None or entry is None:
                raise RedriveRefused(why or entry_id)
            new_task_id = republish(app, redriven(entry))
        except BaseException:
            self.redrives.release(entry_id, token)
            raise
        if not self.redrives.confirm(entry, token, new_task_id, by):
            log.warning("dlq_redrive_claim_lapsed", entry_id=entry_id, task_id=new_task_id)
        metrics.DLQ_REDRIVEN.labels(entry.task_name).inc()
        return new_task_id

    def redrive_matching(
        self, where: Filter, app: Publisher, by: str = "operator"
    ) -> tuple[list[str], list[str]]:
        """Redrive every matching entry: (new task ids, refused entry ids)."""
        done: list[str] = []
        refused: list[str] = []
        for entry in list(self.iter(where)):
            try:
                done.append(self.redrive(entry.id, app, by))
            except RedriveRefused:
                refused.append(entry.id)
        return done, refused

    def purge(self, where: Filter | None = None) -> int:
        ids = [entry.id for entry in self.iter(where)]
        purged = sum(1 for entry_id in ids if self.remove(entry_id))
        metrics.DLQ_PURGED.inc(purged)
        return purged
