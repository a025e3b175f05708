"""The breaker monitor: snapshots of every breaker, with history, and alerts once per episode.

Run by the beat job ``breaker-monitor`` (seed 003: every 2 minutes). Each run takes a
:class:`BreakerSnapshot` of every registered breaker — state, mode, failure and slow-call
rates over its window, consecutive failures, time in state, and transitions and flaps in
the last hour, counted from the transitions stream with ``XRANGE`` (the ``alerts``
consumer group is the transitions' delivery) — keeps the latest per breaker in
``P:cbmon:latest`` and appends it to the history stream ``P:cbmon:history`` (trimmed by
age and count). Two alerts, each exactly once per episode fleet-wide (an atomic marker
per breaker and episode in ``P:cbmon:episodes``, however many monitors run at once):

* ``circuit_breaker_open_too_long``: the breaker has not closed for ``open_alert_seconds``
  (open, or half-open failing its trials). The episode starts when it leaves closed
  (the breaker's ``down_since``) and ends when it closes.
* ``circuit_breaker_flapping``: more than ``flaps_per_hour`` trips (closed -> open) in
  the last hour. The episode ends when the count falls below ``flaps_per_hour``.

A monitor that dies between taking a marker and running the hooks loses that alert; it
never raises one twice.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, cast

from reliability.alerts import AlertHooks
from reliability.breaker.circuit import CircuitBreaker
from reliability.breaker.config import EVENTS_STREAM
from reliability.scripts import compose
from reliability.store import Store

FLAP_WINDOW_SECONDS = 3600.0
LATEST, HISTORY, EPISODES = "cbmon:latest", "cbmon:history", "cbmon:episodes"
OPEN_TOO_LONG, FLAPPING = "circuit_breaker_open_too_long", "circuit_breaker_flapping"
_PAGE = 1000

# KEYS state hash, window   ARGV now, window kind, window size
# -> since, down_since, consecutive failures, calls, failures, slow calls (read only)
_WINDOW = compose(
    body="""
local h = redis.call('HMGET', KEYS[1], 'since', 'down_since', 'consec')
local calls, failures, slows = 0, 0, 0
if ARGV[2] == 'count' then
  local n = redis.call('HMGET', KEYS[2] .. ':n', 'c', 'f', 's')
  calls, failures, slows = tonumber(n[1] or '0'), tonumber(n[2] or '0'), tonumber(n[3] or '0')
else
  local flat = redis.call('HGETALL', KEYS[2])
  for i = 1, #flat, 2 do
    local b, kind = string.match(flat[i], '^(%d+):(%a)$')
    if b and tonumber(b) > now - tonumber(ARGV[3]) then
      local n = tonumber(flat[i + 1])
      if kind == 'c' then calls = calls + n
      elseif kind == 'f' then failures = failures + n
      else slows = slows + n end
    end
  end
end
return {h[1] or '', h[2] or '', h[3] or '0', calls, failures, slows}
"""
)
# KEYS episodes   ARGV name, open episode ('' = closed), open due (1/0),
# flap verdict (start|end|keep), flap episode   -> {open alert raised, flap alert raised}
_EPISODE = """
local fo, ff = 'open:' .. ARGV[1], 'flap:' .. ARGV[1]
local opened, flapped = 0, 0
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], fo)
elseif ARGV[3] == '1' and redis.call('HGET', KEYS[1], fo) ~= ARGV[2] then
  redis.call('HSET', KEYS[1], fo, ARGV[2])
  opened = 1
end
if ARGV[4] == 'start' then
  flapped = redis.call('HSETNX', KEYS[1], ff, ARGV[5])
elseif ARGV[4] == 'end' then
  redis.call('HDEL', KEYS[1], ff)
end
return {opened, flapped}
"""


@dataclass(frozen=True)
class MonitorPolicy:
    """When to alert and how much history to keep (settings: ``RELIABLE_MONITOR__*``)."""

    open_alert_seconds: float = 600.0
    flaps_per_hour: int = 3
    history_seconds: float = 7 * 86400.0
    history_max_entries: int = 100_000
    window_seconds: float = FLAP_WINDOW_SECONDS


@dataclass
class BreakerSnapshot:
    """One breaker as one monitor run saw it (times in Unix seconds, rates 0..1)."""

    breaker: str
    at: float
    state: str
    mode: str
    failure_rate: float
    slow_call_rate: float
    window_calls: int
    failure_count: int  # consecutive failures (seed 000's failure_count)
    time_in_state_seconds: float | None  # None: it never changed state
    down_since: float | None  # when it last left closed; None while closed
    down_seconds: float | None
    open_until: float | None
    transitions_last_hour: int = 0
    flaps_last_hour: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class BreakerMonitor:
    """Snapshots, history and once-per-episode alerts (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        breakers: Iterable[CircuitBreaker],
        hooks: AlertHooks | None = None,
        policy: MonitorPolicy | None = None,
    ) -> None:
        self.store = store
        self.breakers = breakers  # iterated on each run: a registry shows new breakers
        self.hooks = hooks or AlertHooks()
        self.policy = policy or MonitorPolicy()
        prefix = store.keys.prefix
        self.latest_key, self.history_key = f"{prefix}:{LATEST}", f"{prefix}:{HISTORY}"
        self.episodes_key, self.events = f"{prefix}:{EPISODES}", f"{prefix}:{EVENTS_STREAM}"

    def run(self, now: float | None = None) -> dict[str, int]:
        """One run; ``now`` (tests only) is the breakers' clock, else Redis ``TIME``.
        Returns counts for the job ledger: breakers, not closed, flapping, alerts raised."""
        store_now = self.store.now()
        moment = store_now if now is None else now
        snaps = [self.snapshot(b, moment, now) for b in self.breakers]
        transitions, flaps = self._counts(store_now, moment)
        for snap in snaps:
            snap.transitions_last_hour = transitions[snap.breaker]
            snap.flaps_last_hour = flaps[snap.breaker]
        self._record(snaps, store_now)
        alerts = sum(self._judge(snap) for snap in snaps)
        return {
            "breakers": len(snaps),
            "not_closed": sum(s.state != "closed" for s in snaps),
            "flapping": sum(s.flaps_last_hour > self.policy.flaps_per_hour for s in snaps),
            "alerts": alerts,
        }

    def snapshot(
        self, breaker: CircuitBreaker, moment: float, now: float | None = None
    ) -> BreakerSnapshot:
        """``breaker`` at ``moment`` (its stream counts are filled in by :meth:`run`);
        ``now`` is passed to the breaker's scripts (tests only; else Redis ``TIME``)."""
        seen, config = breaker.snapshot(now=now), breaker.config
        window = ["" if now is None else now, config.window_type, config.window_size]
        since, down, consec, calls, failures, slows = self.store.run(
            _WINDOW, breaker.keys[:2], window, "breaker monitor read"
        )
        calls = int(calls)
        state = str(seen["state"])
        if state != "closed" and not down:
            down = since  # left closed before down_since was recorded
        return BreakerSnapshot(
            breaker=breaker.name,
            at=moment,
            state=state,
            mode=str(seen["mode"]),
            failure_rate=round(int(failures) / calls, 4) if calls else 0.0,
            slow_call_rate=round(int(slows) / calls, 4) if calls else 0.0,
            window_calls=calls,
            failure_count=int(consec),
            time_in_state_seconds=_age(moment, since),
            down_since=None if state == "closed" or not down else float(down),
            down_seconds=None if state == "closed" else _age(moment, down or moment),
            open_until=seen["open_until"],
        )

    def _counts(self, store_now: float, moment: float) -> tuple[Counter[str], Counter[str]]:
        """Transitions and trips (closed -> open) per breaker in the last window: read
        from one window back by id (Redis time), counted by ``at`` (the breakers' clock)."""
        start = f"{math.floor((store_now - self.policy.window_seconds) * 1000)}-0"
        transitions: Counter[str] = Counter()
        flaps: Counter[str] = Counter()
        while True:
            page = self.store.call(
                "breaker monitor transitions", functools.partial(_page, self.events, start, "+")
            )
            for _id, fields in page:
                at = float(fields.get("at") or 0)
                if moment - self.policy.window_seconds < at <= moment:
                    name = fields.get("breaker", "")
                    transitions[name] += 1
                    if fields.get("from") == "closed" and fields.get("to") == "open":
                        flaps[name] += 1
            if len(page) < _PAGE:
                return transitions, flaps
            start = f"({page[-1][0]}"

    def _record(self, snaps: list[BreakerSnapshot], store_now: float) -> None:
        """Latest snapshot per breaker (replaced whole), and the history stream, trimmed."""
        oldest = f"{math.floor((store_now - self.policy.history_seconds) * 1000)}-0"

        def write(client: Any) -> None:
            pipe = client.pipeline(transaction=True)
            pipe.delete(self.latest_key)
            for snap in snaps:
                text = snap.to_json()
                pipe.hset(self.latest_key, snap.breaker, text)
                pipe.xadd(
                    self.history_key,
                    {"breaker": snap.breaker, "snapshot": text},
                    maxlen=self.policy.history_max_entries,
                    approximate=False,
                )
            pipe.xtrim(self.history_key, minid=oldest, approximate=False)
            pipe.execute()

        self.store.call("breaker monitor record", write)

    def _judge(self, snap: BreakerSnapshot) -> int:
        """Take the episode markers that are due; raise the alerts this run won."""
        policy, flaps = self.policy, snap.flaps_last_hour
        down = snap.down_seconds
        # The episode is named by when the breaker left closed: the same for every monitor.
        episode = "" if down is None else f"{snap.down_since or 0:.6f}"
        due = down is not None and down >= policy.open_alert_seconds
        limit = policy.flaps_per_hour
        verdict = "start" if flaps > limit else "end" if flaps < limit else "keep"
        opened, flapped = self.store.run(
            _EPISODE,
            [self.episodes_key],
            [snap.breaker, episode, int(due), verdict, f"{snap.at:.6f}"],
            "breaker monitor episode",
        )
        context = asdict(snap)
        if opened:
            self.hooks.emit(
                OPEN_TOO_LONG,
                f"circuit breaker {snap.breaker} has not closed for {down:.0f}s"
                f" (alert after {policy.open_alert_seconds:g}s)",
                {**context, "open_alert_seconds": policy.open_alert_seconds},
            )
        if flapped:
            self.hooks.emit(
                FLAPPING,
                f"circuit breaker {snap.breaker} opened {flaps} times in the last hour"
                f" (more than {policy.flaps_per_hour})",
                {**context, "flaps_per_hour": policy.flaps_per_hour},
            )
        return int(opened) + int(flapped)


def _age(moment: float, since: str | float | None) -> float | None:
    return None if since is None or since == "" else round(max(0.0, moment - float(since)), 3)


def _page(key: str, low: str, high: str, client: Any, reverse: bool = False) -> list[Any]:
    """One page of a stream, oldest first from ``low`` (newest first from ``high``)."""
    if reverse:
        return list(client.xrevrange(key, high, low, count=_PAGE))
    return list(client.xrange(key, low, high, count=_PAGE))


def latest_snapshots(store: Store) -> list[dict[str, Any]]:
    """The last monitor run's snapshot of each breaker, by name."""
    key = f"{store.keys.prefix}:{LATEST}"
    raw = cast("dict[str, str]", store.call("breaker monitor latest", lambda c: c.hgetall(key)))
    return [json.loads(text) for _name, text in sorted(raw.items())]


def snapshot_history(
    store: Store, breaker: str | None = None, count: int = 100
) -> list[dict[str, Any]]:
    """Snapshots from the history stream, newest first (of ``breaker`` only, when given)."""
    key, top = f"{store.keys.prefix}:{HISTORY}", "+"
    found: list[dict[str, Any]] = []
    while len(found) < count:
        page = store.call(
            "breaker monitor history", functools.partial(_page, key, "-", top, reverse=True)
        )
        found += [
            json.loads(f["snapshot"]) for _id, f in page if breaker in (None, f.get("breaker"))
        ]
        if len(page) < _PAGE:
            break
        top = f"({page[-1][0]}"
    return found[:count]
