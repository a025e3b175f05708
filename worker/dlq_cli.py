"""``reliable dlq`` (also ``reliable-dlq``): list, show, retry, reprocess and purge dead letters.

Retry re-enqueues the same work (idempotency key, correlation id, exchange, routing key,
priority, expiry, time limits: :mod:`reliability.republish`); an entry is claimed first,
removed only after its re-enqueue succeeded, the redrive recorded (``show`` prints the
work's trail), and the number of redrives per entry is capped. Reprocess runs the
beat job's policy once (:mod:`reliability.reprocess`), ``--dry-run`` to see what it
would do. Purge asks for confirmation unless ``--yes`` is given. Times are ISO-8601
UTC; errors are one line on stderr (:mod:`worker.console`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from reliability.dlq import DeadLetter, FailureClass, Filter
from reliability.reprocess import ReprocessResult
from worker.console import (
    CommandError,
    OneLineParser,
    iso,
    non_negative_int,
    operate,
    positive_float,
    positive_int,
)
from worker.reprocess import reprocessor

PROG = "reliable dlq"
TIME_FIELDS = ("first_failure_at", "last_failure_at")


def _shown(entry: DeadLetter) -> dict[str, Any]:
    """An entry as printed (``show``, ``list --json``): its times in ISO-8601 UTC."""
    data = asdict(entry)
    for name in TIME_FIELDS:
        data[name] = iso(data[name])
    data["fingerprint"] = entry.fingerprint
    return data


def _filter(args: argparse.Namespace) -> Filter:
    since = time.time() - args.since_minutes * 60 if args.since_minutes else None
    return Filter(
        failure_class=args.failure_class,
        task_name=args.task,
        since=since,
        fingerprint=getattr(args, "fingerprint", None),
    )


def _operator() -> str:
    """Who redrives from this terminal, for the audit trail."""
    return f"cli:{os.environ.get('USER') or 'operator'}@{socket.gethostname()}"


def _fingerprint(text: str) -> str:
    if len(text) != 12 or any(c not in "0123456789abcdef" for c in text):
        raise argparse.ArgumentTypeError(f"a fingerprint is 12 hex digits (got {text!r})")
    return text


def _print_result(result: ReprocessResult) -> None:
    """A run's counts, its fingerprints and its first decisions, one line each."""
    counts = result.summary()
    verb = "would " if result.dry_run else ""
    print(
        f"reprocess{' (dry run)' if result.dry_run else ''}: {counts['scanned']} entries;"
        f" {verb}redrive {counts['redrive']}, hold {counts['hold']}, wait {counts['wait']},"
        f" skip {counts['skip']}; {verb}alert {counts['alerted']}"
    )
    for fp, group in result.fingerprints.items():
        actions = " ".join(
            f"{a}={group[a]}" for a in ("redrive", "hold", "wait", "skip") if a in group
        )
        print(f"  fingerprint {fp}  entries={group['entries']} {actions}  {group['label'][:80]}")
    for d in result.decisions:
        print(f"  {d.entry_id}  {d.task:<20} {d.failure_class:<22} {d.action}: {d.reason}")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def filtered(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--class", dest="failure_class", choices=[c.value for c in FailureClass])
        p.add_argument("--task", help="task name, e.g. payments.charge")
        p.add_argument("--fingerprint", type=_fingerprint, help="error fingerprint (12 hex)")
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
    p_reprocess = sub.add_parser("reprocess", help="redrive by policy now (the beat job's run)")
    p_reprocess.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    p_reprocess.add_argument("--json", action="store_true")
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
                f"{e.fingerprint}  attempts={e.attempts} redrives={e.redrive_count}"
                f"  {e.reason[:80]}"
            )
        print(f"-- {len(entries)} shown of {dlq.count()} total")
        return 0
    if args.command == "show":
        entry = dlq.get(args.id)
        if entry is None:
            raise CommandError(f"no DLQ entry {args.id}")
        trail = dlq.redrives.trail(entry.task_id)
        shown = {**_shown(entry), "redrives": [{**r, "at": iso(r["at"])} for r in trail]}
        print(json.dumps(shown, indent=2, default=str))
        return 0
    if args.command == "reprocess":
        return _reprocess(service, args)
    if args.command == "retry":
        if args.all:
            done, refused = dlq.redrive_matching(_filter(args), service.app, _operator())
            print(f"re-enqueued {len(done)}; refused {len(refused)}")
            if refused:
                raise CommandError(
                    f"{len(refused)} entries were refused (redrive cap {dlq.max_redrives},"
                    " masked arguments, or another redrive held them) and stay in the DLQ"
                )
            return 0
        # RedriveRefused: one line, exit 1
        task_id = dlq.redrive(args.id, service.app, _operator())
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


def _reprocess(service: Any, args: argparse.Namespace) -> int:
    """One run of the reprocessing policy (the beat job's), or a dry run of it."""
    # The tasks' declarations (breaker, rate limits) gate their entries: register them.
    service.app.loader.import_default_modules()
    work = reprocessor(service.app, service.runtime, service.settings, by=_operator(), log=False)
    result = work.run(dry_run=args.dry_run)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        _print_result(result)
    failed = result.reasons.get("skip: publish failed", 0)
    if failed:
        raise CommandError(f"{failed} redrives could not be published; their entries stay")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "retry" and bool(args.id) == bool(args.all):
        parser.error("retry needs an entry id or --all (not both)")
    return operate(PROG, lambda service: command(service, args))


if __name__ == "__main__":
    raise SystemExit(main())
