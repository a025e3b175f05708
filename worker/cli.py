"""``reliable``: run the service, and look after it.

``reliable run`` starts everything a developer needs on a fresh machine: the embedded
Redis when no URL is configured, the sandbox provider (development only, when the
providers point at it), a worker and beat — and supervises them (:mod:`worker.supervisor`):
a child that exits is restarted with backoff, one that keeps dying stops the lot.
Ctrl-C (or SIGTERM) is a warm shutdown of everything it started, then of the embedded
Redis it started; a second Ctrl-C is a cold shutdown.

``reliable dlq ...`` is the dead-letter queue CLI, ``reliable degradation`` shows and
overrides the degradation level, ``reliable ledger`` tails the outcome ledger,
``reliable report`` prints the latest reliability report, ``reliable breakers`` and
``reliable limits`` show and change the fleet's circuit breakers and rate limits.
Errors are one line on stderr (:mod:`worker.console`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config import Environment, Settings, load_settings
from reliability.errors import ConfigurationError
from reliability.jobs import Jobs
from reliability.ratelimit import RateLimit, RateLimiter
from reliability.reports import HOUR, PERIODS
from worker import embedded
from worker.celeryconfig import embedded_data_dir
from worker.console import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    OneLineParser,
    UsageError,
    iso,
    operate,
    positive_float,
    positive_int,
)
from worker.report_cli import show_report
from worker.schedule import JOBS
from worker.supervisor import MAX_DEATHS, WINDOW_SECONDS, Program, Supervisor

PROG = "reliable"
SANDBOX_DEFAULT = "http://127.0.0.1:8099"
# What reliable run allows beyond the worker's soft-shutdown grace before it escalates
# a shutdown step (warm -> cold -> kill).
STOP_MARGIN_SECONDS = 10.0
BREAKER_MODES = ("normal", "forced_open", "disabled", "shadow")
# The values `limits set` can change, per kind (RateLimiter.set_rate's arguments).
SETTABLE = {
    "gcra": ("rate", "burst"),
    "sliding": ("max_requests", "window_seconds"),
    "fixed": ("max_requests", "window_seconds"),
    "concurrency": ("limit",),
}


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


# Where `reliable run`'s worker serves /metrics when RELIABLE_METRICS__PORT is not set
# (celery-exporter's is 9808, the ops service 8080).
RUN_METRICS_PORT = 9810


def service_programs(
    settings: Settings,
    concurrency: int | None,
    with_beat: bool,
    with_sandbox: bool,
    with_ops: bool = False,
    with_flower: bool = False,
) -> list[Program]:
    """What ``reliable run`` supervises: the sandbox provider (development, when the
    providers point at it), a worker, beat, the ops service and (``--flower``) Flower.
    The sandbox and beat stop only after the worker exited: tasks finishing in its grace
    still call the sandbox."""
    programs: list[Program] = []
    if (
        with_sandbox
        and settings.environment is Environment.DEVELOPMENT
        and settings.providers.payment_base_url == SANDBOX_DEFAULT
    ):
        programs.append(
            Program("sandbox", _python("worker.sandbox", "--port", "8099"), stops_last=True)
        )
    worker = _python("celery", "-A", "worker.app", "worker", "-l", settings.log.level)
    if concurrency:
        worker += ["-c", str(concurrency)]
    # One worker on this host: its metrics are on unless RELIABLE_METRICS__PORT says (0 = off).
    metrics = (
        {}
        if "port" in settings.metrics.model_fields_set
        else {"RELIABLE_METRICS__PORT": str(RUN_METRICS_PORT)}
    )
    programs.append(Program("worker", worker, cold_signal=signal.SIGQUIT, env=metrics))
    if with_beat:
        programs.append(
            Program(
                "beat", _python("celery", "-A", "worker.app", "beat", "-l", "INFO"), stops_last=True
            )
        )
    if with_ops:
        programs.append(Program("ops", _python("worker.ops"), stops_last=True))
    if with_flower:
        m = settings.metrics
        flower = _python("celery", "-A", "worker.app", "flower")
        flower += [f"--port={m.flower_port}", f"--address={m.flower_host}"]
        programs.append(Program("flower", flower, stops_last=True))
    return programs


def run(
    concurrency: int | None,
    with_beat: bool,
    with_sandbox: bool,
    *,
    with_ops: bool = True,
    with_flower: bool = False,
    max_deaths: int = MAX_DEATHS,
    window_seconds: float = WINDOW_SECONDS,
) -> int:
    settings = load_settings()
    env = dict(os.environ)
    programs = service_programs(
        settings, concurrency, with_beat, with_sandbox, with_ops, with_flower
    )
    supervisor = Supervisor(
        programs,
        env,
        max_deaths=max_deaths,
        window_seconds=window_seconds,
        grace_seconds=settings.worker.soft_shutdown_timeout_seconds + STOP_MARGIN_SECONDS,
    )
    # Beat keeps its schedule file in the data directory, with or without a Redis URL.
    Path(settings.redis.data_dir).mkdir(parents=True, exist_ok=True)
    data_dir = embedded_data_dir(settings)
    started = False
    try:
        if data_dir is not None:
            started = embedded.start_embedded_redis(data_dir)
            env["RELIABLE_REDIS__URL"] = embedded.embedded_url(data_dir)
            supervisor.say(
                f"embedded redis (AOF, appendfsync always) at "
                f"{env['RELIABLE_REDIS__URL']}"
                f"{'' if started else ' (already running: left running at exit)'}"
            )
        return supervisor.run()
    except KeyboardInterrupt:  # Ctrl-C before the supervisor took over: nothing started
        return EXIT_INTERRUPTED
    finally:
        if started:
            assert data_dir is not None
            embedded.stop_embedded_redis(data_dir)
            supervisor.say("embedded redis stopped")


def tail_ledger(service: Any, count: int) -> int:
    for row in reversed(service.runtime.ledger.tail(count)):
        at = row.get("at") or int(str(row["id"]).split("-")[0]) / 1000
        print(
            f"{iso(at)}  {row.get('outcome', ''):<18} {row.get('task', ''):<22} "
            f"{row.get('task_id', '')}  attempt={row.get('attempt', '')}  "
            f"{row.get('detail', '')}".rstrip()
        )
    return 0


def job_runs(service: Any, job: str | None, count: int, as_json: bool) -> int:
    """The newest maintenance job runs first (``reliable jobs``)."""
    runs = Jobs(service.runtime.store).runs(job, count)
    if as_json:
        print(json.dumps([dataclasses.asdict(run) for run in runs], indent=2, default=str))
        return 0
    for run in runs:
        took = run.finished_at - run.started_at
        detail = run.error or " ".join(f"{k}={v}" for k, v in run.result.items())
        print(
            f"{iso(run.started_at)}  {run.job:<18} slot={run.slot:<12} {run.status:<7} "
            f"{took:7.3f}s  {detail}".rstrip()
        )
    print(f"-- {len(runs)} run(s) shown")
    return 0


def _breaker_line(snap: dict[str, Any]) -> str:
    state = "open" if snap["mode"] == "forced_open" else snap["state"]
    return (
        f"{snap['name']:<16} {state:<10} mode={snap['mode']:<12} "
        f"open_until={iso(snap['open_until'])}"
    )


def breakers(service: Any, action: str, name: str | None, mode: str | None) -> int:
    from reliability.breaker import BreakerMode

    registry = service.runtime.breakers
    if action == "list":
        for breaker in registry:
            print(_breaker_line(breaker.snapshot()))
        return 0
    assert name is not None  # main() checked the arguments
    if name not in registry.configs:
        raise CommandError(
            f"no circuit breaker named {name!r} (known: {', '.join(sorted(registry.configs))})"
        )
    breaker = registry.get(name)
    if action == "reset":
        breaker.reset()
    else:
        breaker.set_mode(BreakerMode(mode))
    print(_breaker_line(breaker.snapshot()))
    return 0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def monitor(service: Any, as_json: bool) -> int:
    """The breaker monitor's latest snapshot of each breaker (``reliable monitor``)."""
    from reliability.breaker.monitor import latest_snapshots

    snaps = latest_snapshots(service.runtime.store)
    if as_json:
        times = ("at", "down_since", "open_until")
        shown = [{k: iso(v) if k in times and v else v for k, v in s.items()} for s in snaps]
        print(json.dumps(shown, indent=2))
        return 0
    for s in snaps:
        print(
            f"{s['breaker']:<16} {s['state']:<10} mode={s['mode']:<12} "
            f"in_state={_seconds(s['time_in_state_seconds'])} "
            f"down={_seconds(s['down_seconds'])} failure_rate={s['failure_rate']:.2f} "
            f"slow_rate={s['slow_call_rate']:.2f} calls={s['window_calls']} "
            f"consecutive={s['failure_count']} transitions/h={s['transitions_last_hour']} "
            f"flaps/h={s['flaps_last_hour']}  at={iso(s['at'])}"
        )
    print(f"-- {len(snaps)} breaker(s) as the breaker-monitor job last saw them")
    return 0


def _num(value: float) -> str:
    """A number as an operator writes it: 20, 0.5, 1000000 (never 1e+06)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.6f}".rstrip("0")


def _values(limit: RateLimit) -> str:
    if limit.kind == "gcra":
        values = f"rate={_num(limit.rate)}/s burst={limit.burst}"
    elif limit.kind == "concurrency":
        values = f"limit={limit.limit} lease={_num(limit.lease_seconds)}s"
    else:
        values = f"max_requests={limit.max_requests} window={_num(limit.window_seconds)}s"
    return values + (f" cost={limit.cost}" if limit.cost != 1 else "")


def describe(limit: RateLimit) -> str:
    """A limit's values, labelled: ``gcra  rate=20/s burst=30  per=global``."""
    return f"{limit.kind:<12} {_values(limit):<32} per={limit.per}"


def _limit_line(limiter: RateLimiter) -> str:
    """The limit as the fleet applies it now, and its settings when changed at runtime."""
    current = limiter.current()
    line = f"{limiter.limit.name:<24} {describe(current)}"
    if current != limiter.limit:
        line += f"  (set at runtime; settings: {_values(limiter.limit)})"
    return line


def _configured(service: Any, name: str) -> RateLimit:
    limits = service.runtime.rate_limits
    if name not in limits:
        raise CommandError(f"no rate limit named {name!r} (known: {', '.join(sorted(limits))})")
    return limits[name]


def limits(
    service: Any, action: str, name: str | None, scope: str | None, values: dict[str, Any]
) -> int:
    store = service.runtime.store
    if action == "list":
        for limit in service.runtime.rate_limits.values():
            print(_limit_line(RateLimiter(store, limit)))
        return 0
    assert name is not None  # main() checked the arguments
    limit = _configured(service, name)
    if action == "set":
        allowed = SETTABLE[limit.kind]
        wrong = sorted(set(values) - set(allowed))
        if wrong or not values:
            options = " and/or ".join(f"--{o.replace('_', '-')}" for o in allowed)
            raise UsageError(f"rate limit {name} is {limit.kind}: set {options}")
        limiter = RateLimiter(store, limit)
        # Validated as the limit would be (a non-positive rate, a burst below the cost).
        try:
            wanted = dataclasses.replace(limiter.current(), **values)
        except ConfigurationError as exc:
            raise UsageError(str(exc)) from None
        given = set(values)

        def pick(name: str) -> Any:
            return getattr(wanted, name) if name in given else None

        limiter.set_rate(
            pick("rate"),
            pick("burst"),
            max_requests=pick("max_requests"),
            window_seconds=pick("window_seconds"),
            limit=pick("limit"),
        )
        print(_limit_line(limiter))
        return 0
    if limit.per == "global" and scope not in (None, "-"):
        raise CommandError(f"rate limit {name} is global: it takes no --scope")
    if limit.per != "global" and scope is None:
        raise CommandError(
            f"rate limit {name} is per {limit.per}: name the value to reset "
            f"with --scope (e.g. a tenant id; '-' for calls without one)"
        )
    limiter = RateLimiter(store, limit, scope=scope or "-")
    limiter.reset()
    where = "" if limit.per == "global" else f" scope={scope}"
    print(
        f"{name}{where}: usage reset, runtime overrides cleared; "
        f"{_num(limiter.available_tokens)} available now"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="worker + beat (+ embedded redis and sandbox), supervised")
    p_run.add_argument("-c", "--concurrency", type=positive_int)
    p_run.add_argument("--no-beat", action="store_true")
    p_run.add_argument("--no-ops", action="store_true", help="without the ops HTTP service")
    p_run.add_argument("--no-sandbox", action="store_true")
    p_run.add_argument(
        "--flower",
        action="store_true",
        help="also start Flower on RELIABLE_METRICS__FLOWER_HOST:__FLOWER_PORT (127.0.0.1:5555)",
    )
    p_run.add_argument(
        "--max-deaths",
        type=int,
        default=MAX_DEATHS,
        help="give up when a child dies this often within --window (5)",
    )
    p_run.add_argument(
        "--window",
        type=float,
        default=WINDOW_SECONDS,
        metavar="SECONDS",
        help="seconds in which --max-deaths deaths make it give up (60)",
    )
    sub.add_parser(
        "dlq", help="the dead-letter queue CLI (see reliable dlq --help)", add_help=False
    )
    sub.add_parser(
        "degradation",
        help="show, set or clear the degradation level (see reliable degradation --help)",
        add_help=False,
    )
    sub.add_parser(
        "ops", help="the ops HTTP service: health, metrics, admin API, dashboard (RELIABLE_OPS__*)"
    )
    p_ledger = sub.add_parser("ledger", help="the last outcomes")
    p_ledger.add_argument("-n", "--count", type=positive_int, default=50)
    p_jobs = sub.add_parser("jobs", help="the maintenance job runs beat sent (newest first)")
    p_jobs.add_argument(
        "--job", choices=[job.name for job in JOBS], help="only this job (dlq-cleanup, ...)"
    )
    p_jobs.add_argument("-n", "--count", type=positive_int, default=20)
    p_jobs.add_argument("--json", action="store_true")
    p_report = sub.add_parser("report", help="the latest reliability report (Markdown or JSON)")
    p_report.add_argument("--period", choices=PERIODS, default=HOUR)
    p_report.add_argument("--json", action="store_true")
    p_health = sub.add_parser(
        "health", help="check every component now; exit 1 when not ready (a critical one down)"
    )
    p_health.add_argument("--json", action="store_true", help="seed 002's readiness body")
    p_cb = sub.add_parser("breakers", help="list, reset or set the mode of circuit breakers")
    p_cb.add_argument("action", choices=["list", "reset", "mode"])
    p_cb.add_argument("name", nargs="?")
    p_cb.add_argument("mode", nargs="?", choices=BREAKER_MODES)
    p_mon = sub.add_parser("monitor", help="the breaker monitor's latest snapshots")
    p_mon.add_argument("--json", action="store_true")
    p_rl = sub.add_parser("limits", help="list rate limits, change one at runtime, reset one")
    p_rl.add_argument("action", choices=["list", "set", "reset"])
    p_rl.add_argument("name", nargs="?")
    p_rl.add_argument("--scope", help="the tenant/user/... value of a scoped limit to reset")
    for option, kind in (
        ("rate", positive_float),
        ("burst", positive_int),
        ("max-requests", positive_int),
        ("window-seconds", positive_float),
        ("limit", positive_int),
    ):
        p_rl.add_argument(f"--{option}", type=kind)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """Argument combinations argparse cannot express: a one-line usage error (exit 2)."""
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "breakers":
        if args.action != "list" and not args.name:
            parser.error(f"breakers {args.action} needs a breaker name")
        if args.action == "mode" and not args.mode:
            parser.error(f"breakers mode needs a mode: {', '.join(BREAKER_MODES)}")
        if args.action != "mode" and args.mode:
            parser.error(f"unrecognized arguments: {args.mode}")
    if args.command == "limits":
        if args.action != "list" and not args.name:
            parser.error(f"limits {args.action} needs a rate limit name")
        if args.action == "list" and args.name:
            parser.error(f"unrecognized arguments: {args.name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "dlq":
        from worker.dlq_cli import main as dlq_main

        return dlq_main(rest)
    if args.command == "degradation":
        from worker.degradation_cli import main as degradation_main

        return degradation_main(rest)
    _check(parser, args, rest)
    if args.command == "run":
        if args.max_deaths < 1 or args.window <= 0:
            parser.error("--max-deaths and --window must be positive")
        if args.flower and importlib.util.find_spec("flower") is None:
            parser.error("--flower needs Flower: the flower extra (pip install -e '.[flower]')")
        return run(
            args.concurrency,
            not args.no_beat,
            not args.no_sandbox,
            with_ops=not args.no_ops,
            with_flower=args.flower,
            max_deaths=args.max_deaths,
            window_seconds=args.window,
        )
    if args.command == "ops":
        from worker.ops.__main__ import main as ops_main

        ops_main()
        return 0
    if args.command == "ledger":
        return operate(PROG, lambda service: tail_ledger(service, args.count))
    if args.command == "jobs":
        return operate(PROG, lambda service: job_runs(service, args.job, args.count, args.json))
    if args.command == "report":
        return operate(PROG, lambda service: show_report(service, args.period, args.json))
    if args.command == "health":
        from worker import health

        return operate(
            PROG, lambda service: health.show(service.settings, service.runtime, args.json)
        )
    if args.command == "breakers":
        return operate(PROG, lambda service: breakers(service, args.action, args.name, args.mode))
    if args.command == "monitor":
        return operate(PROG, lambda service: monitor(service, args.json))
    if args.command == "limits":
        values = {
            k: v
            for k in ("rate", "burst", "max_requests", "window_seconds", "limit")
            if (v := getattr(args, k)) is not None
        }
        return operate(
            PROG, lambda service: limits(service, args.action, args.name, args.scope, values)
        )
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
