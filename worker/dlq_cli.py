"""``reliable dlq`` (also ``reliable-dlq``): list, show, retry and purge dead letters.

Retry re-enqueues the same work (idempotency key, correlation id, exchange, routing key,
priority, expiry, time limits: :mod:`reliability.republish`); an entry is removed only
after its re-enqueue succeeded, and the number of redrives per entry is capped.
Purge asks for confirmation unless ``--yes`` is given. Times are ISO-8601 UTC; errors
are one line on stderr (:mod:`worker.console`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from reliability.dlq import DeadLetter, FailureClass, Filter
from worker.console import (
    CommandError,
    OneLineParser,
    iso,
    non_negative_int,
    operate,
    positive_float,
    positive_int,
)

PROG = "reliable dlq"
TIME_FIELDS = ("first_failure_at", "last_failure_at")


def _shown(entry: DeadLetter) -> dict[str, Any]:
    """An entry as printed (``show``, ``list --json``): its times in ISO-8601 UTC."""
    data = asdict(entry)
    for name in TIME_FIELDS:
        data[name] = iso(data[name])
    return data


def _filter(args: argparse.Namespace) -> Filter:
    since = time.time() - args.since_minutes * 60 if args.since_minutes else None
    return Filter(failure_class=args.failure_class, task_name=args.task, since=since)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def filtered(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--class", dest="failure_class", choices=[c.value for c in FailureClass])
        p.add_argument("--task", help="task name, e.g. payments.charge")
        p.add_argument("--since-minutes", type=positive_float)
        return p

    p_list = filtered(sub.add_parser("list", help="entries, newest first"))
    p_list.add_argument("--offset", type=non_negative_int, default=0)
    p_list.add_argument("--limit", type=positive_int, default=20)
    p_list.add_argument("--json", action="store_true")
    p_show = sub.add_parser("show", help="one entry, in full")
    p_show.add_argument("id")
    p_retry = filtered(sub.add_parser("retry", help="re-enqueue one entry, or --all matching"))
    p_retry.add_argument("id", nargs="?")
    p_retry.add_argument("--all", action="store_true")
    p_purge = filtered(sub.add_parser("purge", help="delete matching entries"))
    p_purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub.add_parser("count", help="how many entries")
    return parser


def command(service: Any, args: argparse.Namespace) -> int:
    """Run one parsed ``reliable dlq`` command against the service's DLQ."""
    dlq = service.runtime.dlq
    if args.command == "count":
        print(dlq.count())
        return 0
    if args.command == "list":
        entries = dlq.page(_filter(args), offset=args.offset, limit=args.limit)
        if args.json:
            print(json.dumps([_shown(e) for e in entries], indent=2, default=str))
            return 0
        for e in entries:
            print(
                f"{e.id}  {iso(e.last_failure_at)}  {e.failure_class:<22} {e.task_name:<20} "
                f"attempts={e.attempts} redrives={e.redrive_count}  {e.reason[:80]}"
            )
        print(f"-- {len(entries)} shown of {dlq.count()} total")
        return 0
    if args.command == "show":
        entry = dlq.get(args.id)
        if entry is None:
            raise CommandError(f"no DLQ entry {args.id}")
        print(json.dumps(_shown(entry), indent=2, default=str))
        return 0
    if args.command == "retry":
        if args.all:
            done, refused = dlq.redrive_matching(_filter(args), service.app)
            print(f"re-enqueued {len(done)}; refused {len(refused)} (redrive cap)")
            if refused:
                raise CommandError(
                    f"{len(refused)} entries reached the redrive cap "
                    f"({dlq.max_redrives}) and stay in the DLQ"
                )
            return 0
        task_id = dlq.redrive(args.id, service.app)  # RedriveRefused: one line, exit 1
        print(f"re-enqueued as task {task_id}")
        return 0
    where = _filter(args)  # purge
    matching = sum(1 for _ in dlq.iter(where))
    if not args.yes:
        try:
            answer = input(f"delete {matching} DLQ entries? type 'yes' to confirm: ")
        except EOFError:
            answer = ""
        if answer.strip().lower() != "yes":
            print("nothing deleted")  # the operator's answer, not an error: exit 1, no line
            return 1
    print(f"deleted {dlq.purge(where)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "retry" and bool(args.id) == bool(args.all):
        parser.error("retry needs an entry id or --all (not both)")
    return operate(PROG, lambda service: command(service, args))


if __name__ == "__main__":
    raise SystemExit(main())
