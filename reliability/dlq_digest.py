"""What the DLQ summary needs of each entry, kept per process and read incrementally.

The dashboard asks for the DLQ's totals and fingerprint groups every few seconds, and a
DLQ may hold up to ``max_entries`` (100,000) entries: parsing every envelope each time
costs seconds. An entry's class, task, error and first failure never change once it is
written (a redrive's trail is kept beside it), so each refresh reads the index's ids
(one ``ZRANGE``) and parses only the entries it has not seen; ids gone from the index
are forgotten.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from reliability.dlq import DeadLetter
from reliability.runtime import Runtime
from reliability.security import Masker

BATCH = 1000


@dataclass(frozen=True)
class Digest:
    """One entry, as the summary counts it."""

    id: str
    failure_class: str
    fingerprint: str
    task_name: str
    first_failure_at: float
    label: str


class DlqDigests:
    """The digests of one DLQ's entries, newest first (thread-safe: FastAPI runs sync
    routes on a thread pool)."""

    def __init__(self) -> None:
        self._known: dict[str, Digest] = {}
        self._lock = threading.Lock()

    def read(self, rt: Runtime) -> list[Digest]:
        with self._lock:
            ids = rt.dlq.ids()
            missing = [i for i in ids if i not in self._known]
            for start in range(0, len(missing), BATCH):
                for entry in rt.dlq.read(missing[start : start + BATCH]):
                    self._known[entry.id] = _digest(entry, rt.masker)
            self._known = {i: self._known[i] for i in ids if i in self._known}
            return [self._known[i] for i in ids if i in self._known]


def _digest(entry: DeadLetter, masker: Masker) -> Digest:
    return Digest(
        id=entry.id,
        failure_class=entry.failure_class,
        fingerprint=entry.fingerprint,
        task_name=entry.task_name,
        first_failure_at=entry.first_failure_at,
        label=entry.masked_label(masker.text),
    )


_digests: dict[str, DlqDigests] = {}
_digests_lock = threading.Lock()


def digests_of(rt: Runtime) -> DlqDigests:
    """The process's digests of this runtime's DLQ (one per key prefix)."""
    with _digests_lock:
        return _digests.setdefault(rt.store.keys.dlq, DlqDigests())
