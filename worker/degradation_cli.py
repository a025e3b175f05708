"""``reliable degradation``: show the fleet's degradation level, override it, clear it.

``show`` (the default) prints the level in force, the rules' level and why, and any
override; ``set LEVEL --reason R [--expires-minutes N] [--by WHO]`` holds the fleet at
LEVEL until the override expires (60 minutes unless told) or is cleared; ``clear``
hands the level back to the rules at once. A change is logged and alerted. Times are
ISO-8601 UTC; errors are one line on stderr (:mod:`worker.console`).
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Sequence
from typing import Any

from reliability.degradation import DegradationState, Level, Status
from worker.alerting import alert_hooks
from worker.console import OneLineParser, UsageError, iso, operate, positive_float

PROG = "reliable degradation"
DEFAULT_EXPIRES_MINUTES = 60.0


def _shown(status: Status) -> dict[str, Any]:
    data = status.as_dict()
    for name in ("since", "evaluated_at"):
        data[name] = iso(data[name]) if data[name] else None
    if data["override"] is not None:
        data["override"]["expires"] = iso(data["override"]["expires"])
    return data


def _print(status: Status, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_shown(status), indent=2))
        return
    o = status.override
    print(f"level      {status.level}" + ("  (override)" if o is not None and o.active else ""))
    if status.evaluated_at is None:
        print("computed   - (never evaluated: no degradation-evaluate run yet)")
    else:
        print(f"computed   {status.computed}  {status.reason}")
        print(f"evaluated  {iso(status.evaluated_at)}")
    print(f"since      {iso(status.since)}")
    if o is not None:
        state = "until" if o.active else "expired"
        print(f"override   {o.level} by {o.by} {state} {iso(o.expires)}: {o.reason}")


def _by(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("who sets the override must not be empty")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p_show = sub.add_parser("show", help="the level in force, the rules' level, the override")
    p_set = sub.add_parser("set", help="override the level until it expires or is cleared")
    p_set.add_argument("level", type=str.upper, choices=[x.value for x in Level])
    p_set.add_argument("--reason", required=True)
    p_set.add_argument(
        "--expires-minutes", type=positive_float, default=DEFAULT_EXPIRES_MINUTES, metavar="N"
    )
    p_set.add_argument("--by", type=_by, default=None, help="who sets it (default: your login)")
    p_clear = sub.add_parser("clear", help="drop the override: the rules' level applies")
    for p in (parser, p_show, p_set, p_clear):
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    return parser


def run(service: Any, args: argparse.Namespace) -> int:
    state = DegradationState(
        service.runtime.store, alert_hooks(service.settings, service.runtime, log=False)
    )
    command = args.command or "show"
    if command == "set":
        if not args.reason.strip():
            raise UsageError("--reason must not be empty")
        by = args.by or getpass.getuser()
        status = state.set_override(args.level, args.reason, args.expires_minutes * 60, by)
    elif command == "clear":
        status = state.clear_override()
    else:
        status = state.status()
    _print(status, getattr(args, "json", False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return operate(PROG, lambda service: run(service, args))
