"""What Celery shows of a task's arguments (``argsrepr``/``kwargsrepr``), masked.

Celery carries a repr of the arguments in the message headers, the ``task-sent`` and
``task-received`` events (Flower), its "Received task", "Task succeeded" and failure
log lines and ``inspect`` replies. A producer computes it from the raw arguments, so it
holds whatever secret they hold. Wherever this service shows or publishes a repr, it
is recomputed from the masked arguments (sensitive arguments whole, configured secrets,
values under sensitive keys and the patterns of :mod:`reliability.patterns`):

* :class:`ReliableAMQP` for every message the service publishes itself (parked copies
  republished by the mover, DLQ redrives, child tasks): headers and ``task-sent``;
* ``ReliableRequest`` (:mod:`reliability.request`) for every message a worker receives:
  events, log lines and ``inspect``, the pool child's log lines included.

A repr is bounded (Celery's 1024 characters) and so is the work: it is the repr of a
small masked preview (:meth:`~reliability.security.Masker.preview`), whose strings are
cut before they are masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from celery.app.amqp import AMQP

from reliability.errors import ConfigurationError
from reliability.runtime import get_runtime
from reliability.security import ELLIPSIS, Masker
from reliability.sensitive import NO_SENSITIVE_ARGS, SensitiveArgs

# Celery's default ``argsrepr_maxsize``/``kwargsrepr_maxsize``.
REPR_MAX_CHARS = 1024
# Secrets up to this long are never shown in part (see masked_reprs).
_CUT_MARGIN_CHARS = 256
_FALLBACK = Masker()


def current_masker() -> Masker:
    """The worker runtime's masker; patterns only where no runtime is installed."""
    try:
        return get_runtime().masker
    except ConfigurationError:
        return _FALLBACK


def sensitive_of(task: Any) -> SensitiveArgs:
    """The task's :class:`SensitiveArgs` (none for a task that is not a ReliableTask)."""
    found = getattr(task, "sensitive", None) if task is not None else None
    return found if isinstance(found, SensitiveArgs) else NO_SENSITIVE_ARGS


def masked_reprs(
    task: Any,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    max_chars: int = REPR_MAX_CHARS,
    masker: Masker | None = None,
) -> tuple[str, str]:
    """``(argsrepr, kwargsrepr)`` of a call, masked, each at most ``max_chars`` (+3)."""
    masker = masker or current_masker()
    redacted_args, redacted_kwargs = sensitive_of(task).redact(args or (), kwargs or {})
    # Strings are cut longer than the repr keeps: a secret that the cut splits lies past
    # the repr's own cut, so no part of it is shown.
    chars = max_chars + _CUT_MARGIN_CHARS
    shown_args: Any = masker.preview(redacted_args, chars)
    if isinstance(args, tuple):
        shown_args = tuple(shown_args)
    return (
        _cut(repr(shown_args), max_chars),
        _cut(repr(masker.preview(redacted_kwargs, chars)), max_chars),
    )


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + ELLIPSIS


class ReliableAMQP(AMQP):
    """Celery's AMQP helper; messages this app publishes carry masked argument reprs.

    A repr the caller passes explicitly (``apply_async(argsrepr=...)``) is kept, with
    secrets masked in its text.
    """

    def as_task_v2(
        self,
        task_id: str,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        *rest: Any,
        argsrepr: str | None = None,
        kwargsrepr: str | None = None,
        **options: Any,
    ) -> Any:
        masker = current_masker()
        if argsrepr is None or kwargsrepr is None:
            task = self.app.tasks.get(name)
            shown_args, shown_kwargs = masked_reprs(
                task,
                args if isinstance(args, list | tuple) else (),
                kwargs if isinstance(kwargs, Mapping) else {},
                self.argsrepr_maxsize,
                masker,
            )
            argsrepr = shown_args if argsrepr is None else masker.text(argsrepr)
            kwargsrepr = shown_kwargs if kwargsrepr is None else masker.text(kwargsrepr)
        else:
            argsrepr, kwargsrepr = masker.text(argsrepr), masker.text(kwargsrepr)
        # Through **options: Celery passes these by keyword, never among ``rest``.
        options.update(argsrepr=argsrepr, kwargsrepr=kwargsrepr)
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
