"""The checks a delivery passes before any round trip: its deadline and its arguments.

No Redis is needed to tell that a deadline is unreadable or past, that the arguments do
not bind to the task's signature, or that they fail the task's ``args_model``: the
pipeline dead-letters such a delivery (``poison`` or ``expired``) before admission.
"""

from __future__ import annotations

from pydantic import ValidationError

from reliability.deadline import remaining_seconds, validate_deadline
from reliability.dlq import FailureClass
from reliability.errors import DeadlineExceeded, PoisonMessage
from reliability.guard import Call

# What is wrong: the dead letter's class, its reason, and the exception the task raises.
Problem = tuple[FailureClass, str, type[Exception]]


def problem(call: Call) -> Problem | None:
    """The first thing wrong with this delivery, or None."""
    d = call.d
    unreadable = validate_deadline(d.deadline_header)
    if unreadable:
        return FailureClass.POISON, unreadable, PoisonMessage
    left = remaining_seconds(d.deadline)
    if left is not None and left <= 0:
        reason = f"deadline {d.deadline_header} passed {-left:.3f}s before the task started"
        return FailureClass.EXPIRED, reason, DeadlineExceeded
    try:
        call.spec.signature.bind(*d.args, **d.kwargs)
    except TypeError as exc:
        reason = f"arguments do not fit the task's signature: {exc}"
        return FailureClass.POISON, reason, PoisonMessage
    model = call.spec.option("args_model")
    if model is not None:
        try:
            model.model_validate(call.arguments())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            )
            return FailureClass.POISON, f"invalid arguments: {problems}", PoisonMessage
    return None
