"""Every admin action, recorded with who did what (a bounded Redis stream) and logged."""

from __future__ import annotations

import json
import time
from typing import Any

import structlog

from reliability.security import Masker
from reliability.store import Store

log = structlog.get_logger("worker.ops")


class Audit:
    """The admin actions' trail: ``<prefix>:audit``, newest kept up to ``max_len``."""

    def __init__(self, store: Store, masker: Masker, max_len: int = 10_000) -> None:
        self.store = store
        self.masker = masker
        self.max_len = max_len
        self.stream = f"{store.keys.prefix}:audit"

    def record(self, who: str, action: str, target: str, **details: Any) -> None:
        entry = {
            "at": time.time(),
            "who": who,
            "action": action,
            "target": target,
            "details": self.masker.data(details),
        }
        log.info("admin_action", **{k: v for k, v in entry.items() if k != "at"})
        text = json.dumps(entry, default=str)
        self.store.call(
            "audit",
            lambda c: c.xadd(self.stream, {"entry": text}, maxlen=self.max_len, approximate=True),
        )

    def recent(self, count: int = 100) -> list[dict[str, Any]]:
        rows = self.store.call("audit", lambda c: c.xrevrange(self.stream, count=count))
        return [json.loads(fields["entry"]) for _id, fields in rows]
