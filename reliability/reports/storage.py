"""Reports kept in Redis with retention: the newest N of each period.

``<prefix>:reports:<period>`` is a hash of report JSON by period start (Unix seconds),
``<prefix>:reports:<period>:index`` a sorted set of the same starts. Saving a period
again replaces its report; beyond the retention the oldest reports are dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reliability.reports.period import Period
from reliability.store import Store


class ReportStore:
    """Save, trim and read reports (``retention``: reports kept per period name)."""

    def __init__(self, store: Store, retention: Mapping[str, int] | None = None) -> None:
        self.store = store
        self.retention = dict(retention or {})

    def _keys(self, name: str) -> tuple[str, str]:
        base = f"{self.store.keys.prefix}:reports:{name}"
        return base, f"{base}:index"

    def save(self, period: Period, report: Mapping[str, Any]) -> int:
        """Store ``report`` for ``period``; the number of old reports dropped."""
        data, index = self._keys(period.name)
        field = str(int(period.start))
        keep = self.retention.get(period.name)
        text = json.dumps(report, separators=(",", ":"), sort_keys=False)

        def write(c: Any) -> int:
            pipe = c.pipeline(transaction=True)
            pipe.hset(data, field, text)
            pipe.zadd(index, {field: period.start})
            pipe.execute()
            if keep is None:
                return 0
            old = list(c.zrange(index, 0, -(keep + 1)))
            if not old:
                return 0
            pipe = c.pipeline(transaction=True)
            pipe.hdel(data, *old)
            pipe.zrem(index, *old)
            pipe.execute()
            return len(old)

        return int(self.store.call("report save", write))

    def latest(self, name: str) -> dict[str, Any] | None:
        """The newest report of period ``name``, or None."""
        found = self.recent(name, 1)
        return found[0] if found else None

    def recent(self, name: str, count: int = 10) -> list[dict[str, Any]]:
        """The newest ``count`` reports of period ``name``, newest first."""
        data, index = self._keys(name)

        def read(c: Any) -> list[Any]:
            starts = list(c.zrevrange(index, 0, count - 1))
            return list(c.hmget(data, starts)) if starts else []

        return [json.loads(raw) for raw in self.store.call("report read", read) if raw]

    def count(self, name: str) -> int:
        _, index = self._keys(name)
        return int(self.store.call("report count", lambda c: c.zcard(index)))
