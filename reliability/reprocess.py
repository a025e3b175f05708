"""DLQ reprocessing by policy: redrive what can succeed now, hold what needs an operator.

Each run looks at every entry, oldest failure first, and decides by failure class:

* ``transient`` and ``retry_budget_exhausted`` are **redriven** once their backoff has
  passed (last failure + ``backoff_base_seconds * 2**redrives``, capped), while their
  task's breaker is closed and its rate limits have headroom now, at most
  ``max_per_run`` per run; else they **wait** for a later run. One that reached the
  DLQ's redrive cap or keeps masked arguments is **held**.
* ``permanent``, ``poison``, ``conflict``, ``expired`` (and unknown classes) are **held**.

A held entry raises one alert (``dlq_entry_held``, masked) fleet-wide, ever: a ``SET NX``
marker per entry comes before the hooks. Redrives go through
:meth:`DeadLetterQueue.redrive <reliability.dlq.DeadLetterQueue.redrive>` (claimed,
published, removed, recorded), so racing reprocessors redrive an entry once; the loser
counts it **skipped**. Rate limits and breakers are read, never taken or transitioned
(:mod:`reliability.ratelimit.headroom`): a run redrives no more of a task's entries than
its limits admit right now. A **dry run** decides alike and writes nothing. The result
counts actions, reasons and, per error fingerprint, entries and actions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import structlog

from reliability.alerts import AlertHooks
from reliability.breaker import BreakerRegistry
from reliability.breaker.config import BreakerMode
from reliability.dlq import DeadLetter, DeadLetterQueue, FailureClass
from reliability.errors import RedriveRefused
from reliability.gates import TaskGates
from reliability.ratelimit.headroom import headroom
from reliability.redrive import DEFAULT_CLAIM_SECONDS, refusal
from reliability.republish import Publisher
from reliability.security import Masker, key_token

log = structlog.get_logger("reliability.reprocess")

REDRIVEN_CLASSES = frozenset({FailureClass.TRANSIENT, FailureClass.RETRY_BUDGET_EXHAUSTED})
ALERT_EVENT = "dlq_entry_held"
# Breaker modes that never refuse a call: their state does not hold redrives back.
NOT_GATING = frozenset({BreakerMode.DISABLED, BreakerMode.SHADOW})


class Action(StrEnum):
    REDRIVE = "redrive"  # re-enqueued (dry run: would be)
    HOLD = "hold"  # kept for an operator; alerted once
    WAIT = "wait"  # redrivable by a later run (backoff, breaker, rate limit, run cap)
    SKIP = "skip"  # another redrive held it, it was gone, or its publish failed


@dataclass(frozen=True)
class ReprocessPolicy:
    """How a run redrives (defaults: seed 003's five-minute schedule in mind)."""

    backoff_base_seconds: float = 60.0
    backoff_max_seconds: float = 3600.0
    max_per_run: int = 100
    claim_seconds: float = DEFAULT_CLAIM_SECONDS
    # An alert marker outlives the entry it marks (the DLQ's maximum age).
    alert_marker_seconds: float = 14 * 86_400

    def due(self, entry: DeadLetter) -> float:
        """When ``entry`` may be redriven next: its last failure plus the backoff."""
        backoff = self.backoff_base_seconds * 2.0 ** min(entry.redrive_count, 60)
        return entry.last_failure_at + min(backoff, self.backoff_max_seconds)


@dataclass
class Decision:
    """What a run did (or would do) with one entry, and why."""

    entry_id: str
    task: str
    failure_class: str
    fingerprint: str
    action: Action
    reason: str
    task_id: str | None = None  # the redriven task's id


@dataclass
class ReprocessResult:
    """A run's counts: by action, by reason and per error fingerprint."""

    dry_run: bool
    actions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerted: int = 0
    decisions: list[Decision] = field(default_factory=list)  # the first ``keep`` of them
    keep: int = 100

    def add(self, decision: Decision, error: str) -> None:
        """Count ``decision``; ``error`` is its fingerprint's label (masked)."""
        self.actions[decision.action] += 1
        self.reasons[f"{decision.action}: {decision.reason}"] += 1
        group = self.fingerprints.setdefault(decision.fingerprint, {"label": error})
        group["entries"] = group.get("entries", 0) + 1
        group[str(decision.action)] = group.get(str(decision.action), 0) + 1
        if len(self.decisions) < self.keep:
            self.decisions.append(decision)

    def summary(self) -> dict[str, Any]:
        """The counts (no per-entry decisions): what the job ledger records."""
        return {
            "dry_run": self.dry_run,
            "scanned": sum(self.actions.values()),
            **{str(a): self.actions.get(a, 0) for a in Action},
            "alerted": self.alerted,
            "reasons": dict(sorted(self.reasons.items())),
            "fingerprints": self.fingerprints,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "decisions": [asdict(d) for d in self.decisions]}


@dataclass
class _Run:
    """What one run learnt so far: breakers read, headroom left, redrives made."""

    now: float
    breakers: dict[str, bool] = field(default_factory=dict)
    room: dict[tuple[tuple[str, str], ...], int | None] = field(default_factory=dict)
    redriven: int = 0
    publish_failed: bool = False


class Reprocessor:
    """Runs the policy over the DLQ (see the module docstring)."""

    def __init__(
        self,
        dlq: DeadLetterQueue,
        breakers: BreakerRegistry,
        app: Publisher,
        *,
        gates: Callable[[str], TaskGates] = lambda _name: TaskGates(),
        hooks: AlertHooks | None = None,
        masker: Masker | None = None,
        policy: ReprocessPolicy | None = None,
        by: str = "dlq-reprocess",
    ) -> None:
        self.dlq = dlq
        self.store = dlq.store
        self.breakers = breakers
        self.app = app
        self.gates = gates
        self.hooks = hooks or AlertHooks()
        self.masker = masker or Masker()
        self.policy = policy or ReprocessPolicy()
        self.by = by

    def run(self, *, dry_run: bool = False, now: float | None = None) -> ReprocessResult:
        """One pass over the DLQ; ``now`` (tests only) replaces the store's clock."""
        state = _Run(now=self.store.now() if now is None else now)
        result = ReprocessResult(dry_run=dry_run)
        for chunk in self._entries():
            held: list[tuple[DeadLetter, Decision]] = []
            for entry in chunk:
                decision = self._decide(entry, state)
                if decision.action is Action.REDRIVE and not dry_run:
                    self._redrive(entry, decision, state)
                if decision.action is Action.HOLD:
                    held.append((entry, decision))
                result.add(decision, self._label(entry))
            result.alerted += self._alert(held, dry_run)
        log.info("dlq_reprocessed", dry_run=dry_run, **{str(a): result.actions[a] for a in Action})
        return result

    def _entries(self, batch: int = 500) -> Iterator[list[DeadLetter]]:
        """Every entry, oldest failure first, by batch: the ids first (redrives remove
        entries while the run goes on, which would shift a paged read)."""
        ids = self.dlq.ids(newest_first=False)
        for start in range(0, len(ids), batch):
            yield self.dlq.read(ids[start : start + batch])

    def _decide(self, entry: DeadLetter, state: _Run) -> Decision:
        def verdict(action: Action, reason: str) -> Decision:
            return Decision(
                entry.id, entry.task_name, entry.failure_class, entry.fingerprint, action, reason
            )

        if entry.failure_class not in REDRIVEN_CLASSES:
            return verdict(Action.HOLD, f"class {entry.failure_class}")
        if entry.masked_args:
            return verdict(Action.HOLD, "masked arguments")
        if refusal(entry, entry.id, self.dlq.max_redrives) is not None:
            return verdict(Action.HOLD, "redrive cap")
        if state.now < self.policy.due(entry):
            return verdict(Action.WAIT, "backoff")
        if state.publish_failed:
            return verdict(Action.WAIT, "publish failed this run")
        if state.redriven >= self.policy.max_per_run:
            return verdict(Action.WAIT, "run cap")
        gates = self.gates(entry.task_name)
        if gates.breaker and not self._breaker_closed(gates.breaker, state):
            return verdict(Action.WAIT, f"breaker {gates.breaker} not closed")
        scopes = gates.scopes(entry)
        group = tuple((limit.name, scope) for limit, scope in scopes)
        if group not in state.room:
            state.room[group] = headroom(self.store, scopes, state.now)
        room = state.room[group]
        if room is not None and room <= 0:
            names = ", ".join(limit.name for limit in gates.limits)
            return verdict(Action.WAIT, f"rate limit {names}")
        if room is not None:
            state.room[group] = room - 1
        state.redriven += 1
        return verdict(Action.REDRIVE, "due")

    def _breaker_closed(self, name: str, state: _Run) -> bool:
        """Whether the breaker ``name`` lets redrives through: closed, or a mode that never
        refuses. Read from its state hash (an open breaker past its recovery time is
        half-open, admitting trial calls only: redrives wait for it to close)."""
        if name not in state.breakers:
            try:
                key = self.breakers.get(name).keys[0]
            except KeyError:
                log.warning("dlq_reprocess_unknown_breaker", breaker=name)
                state.breakers[name] = False
                return False
            fields = self.store.call("breaker read", lambda c: c.hmget(key, "state", "mode"))
            current, mode = fields[0] or "closed", fields[1] or BreakerMode.NORMAL
            state.breakers[name] = mode in NOT_GATING or (
                mode != BreakerMode.FORCED_OPEN and current == "closed"
            )
        return state.breakers[name]

    def _redrive(self, entry: DeadLetter, decision: Decision, state: _Run) -> None:
        try:
            decision.task_id = self.dlq.redrive(
                entry.id, self.app, self.by, self.policy.claim_seconds
            )
        except RedriveRefused:
            decision.action, decision.reason = Action.SKIP, "claimed elsewhere or gone"
        except Exception as exc:  # the broker refused the publish: the entry stays
            state.publish_failed = True
            decision.action, decision.reason = Action.SKIP, "publish failed"
            log.error(
                "dlq_redrive_publish_failed",
                entry_id=entry.id,
                error=self.masker.text(f"{type(exc).__name__}: {exc}"),
            )
        else:
            log.info("dlq_entry_redriven", entry_id=entry.id, task_id=decision.task_id)

    def _label(self, entry: DeadLetter) -> str:
        """The failure's kind for people: its fingerprint's text, masked."""
        return entry.masked_label(self.masker.text)

    def _alert(self, held: list[tuple[DeadLetter, Decision]], dry_run: bool) -> int:
        """Alert once per held entry, fleet-wide (a marker per entry, set in one pipeline
        per batch before the hooks run); how many this run alerted (would alert)."""
        if not held:
            return 0
        prefix, seconds = self.store.keys.prefix, max(1, int(self.policy.alert_marker_seconds))
        markers = [f"{prefix}:dlq:alerted:{key_token(entry.id)}" for entry, _ in held]

        def mark(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for marker in markers:
                if dry_run:
                    pipe.exists(marker)
                else:
                    pipe.set(marker, self.by, nx=True, ex=seconds)
            return list(pipe.execute())

        firsts = [not r if dry_run else bool(r) for r in self.store.call("dlq alert", mark)]
        for (entry, decision), first in zip(held, firsts, strict=True):
            if first and not dry_run:
                context = asdict(decision) | {
                    "task_id": entry.task_id,
                    "error": self._label(entry),
                    "redrives": entry.redrive_count,
                }
                message = f"DLQ entry {entry.id} ({entry.task_name}) held: {decision.reason}"
                self.hooks.emit(ALERT_EVENT, self.masker.text(message), self.masker.data(context))
        return sum(firsts)
