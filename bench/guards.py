"""``python -m bench.guards``: every guard against bare Celery, and the off-the-shelf stack.

Issue 3's benchmarks, in one run (``bench.throughput`` stays issue 2's):

1. throughput, interleaved per repetition and pool (solo, prefork): bare Celery, the
   reliable no-op declaring every guard (``bench.guarded_noop``: idempotency, retry,
   breaker, a never-delaying limit) and the off-the-shelf stack (celery-once, pybreaker
   on Redis, limits, tenacity: :mod:`bench.offshelf`) — ratios and round trips per task;
2. utilisation of a global limit by a fleet fed more than it allows (:mod:`bench.utilisation`);
3. admission latency: the fused admission script's p99 against a single ``SET``'s
   (:mod:`bench.latency`).

Prints a table and writes the same numbers to ``bench/results/guards-<time>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report, roundtrips
from bench.latency import TARGET_P99_RATIO, Latency, measure_latency
from bench.runs import ThroughputRun, measure_throughput
from bench.stack import BARE, BY_NAME, DEFAULT_REDIS_URL, PrivateRedis, check_parity, server_info
from bench.throughput import RESULTS_DIR, _git_commit, concurrency
from bench.utilisation import Utilisation, measure_utilisation

FULL = {"tasks": 2000, "repetitions": 5, "latency_iterations": 20000}
QUICK = {"tasks": 300, "repetitions": 5, "latency_iterations": 5000}
# Stacks compared with bare Celery, and whether the targets judge them.
COMPARED = {"guarded": True, "offshelf": False, "reliable": True}
UTILISATION_TARGET = 0.95
# What the issue measured for the off-the-shelf stack, for comparison.
OFFSHELF_REFERENCE = {"round_trips_per_task": 5, "solo_ratio": [0.53, 0.62]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.guards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"fewer tasks and samples ({QUICK})")
    p.add_argument("--tasks", type=int, help=f"no-op tasks per run (default {FULL['tasks']})")
    p.add_argument(
        "--repetitions",
        type=int,
        help=f"interleaved repetitions per pool (default {FULL['repetitions']})",
    )
    p.add_argument("--pools", default="solo,prefork", help="comma separated: solo,prefork")
    p.add_argument(
        "--stacks",
        default="guarded,offshelf",
        help="compared with bare, comma separated: guarded,offshelf,reliable"
        " (reliable: issue 2's idempotent no-op); empty skips throughput",
    )
    p.add_argument(
        "--utilisation-feeds",
        default="flood,steady",
        help="comma separated: flood,steady; empty skips the utilisation runs",
    )
    p.add_argument(
        "--utilisation-seconds",
        type=float,
        default=10.0,
        help="measured window of each utilisation run",
    )
    p.add_argument("--utilisation-rate", type=float, default=100.0, help="the global limit /s")
    p.add_argument("--utilisation-burst", type=int, default=1)
    p.add_argument(
        "--utilisation-overload",
        type=float,
        default=1.5,
        help="work fed, as a multiple of what the limit allows",
    )
    p.add_argument("--utilisation-workers", type=int, default=2, help="prefork workers")
    p.add_argument("--utilisation-concurrency", type=int, default=2, help="children each")
    p.add_argument(
        "--latency-iterations",
        type=int,
        help=f"admission/SET pairs timed (default {FULL['latency_iterations']}; 0 skips)",
    )
    p.add_argument("--latency-warmup", type=int, default=500)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    p.add_argument(
        "--private-redis",
        action="store_true",
        help="run on a redis-server of the bench's own (exact commandstats)",
    )
    p.add_argument(
        "--log-level", default="INFO", help="worker log level of the throughput runs (every stack)"
    )
    p.add_argument(
        "--output", type=Path, help="JSON path (default bench/results/guards-<time>.json)"
    )
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.pools = _list(args.pools)
    args.stacks = _list(args.stacks)
    args.utilisation_feeds = _list(args.utilisation_feeds)
    problems = [f"unknown pool {x}" for x in args.pools if x not in ("solo", "prefork")]
    problems += [f"unknown stack {x}" for x in args.stacks if x not in COMPARED]
    problems += [
        f"unknown feed {x}" for x in args.utilisation_feeds if x not in ("flood", "steady")
    ]
    if args.repetitions < 1 or args.tasks < 1:
        problems.append("need >= 1 task and repetition")
    if problems:
        p.error("; ".join(problems))
    return args


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def offshelf_missing() -> str | None:
    """Why the off-the-shelf stack cannot run here (its libraries are an optional extra)."""
    try:
        import celery_once  # noqa: F401
        import limits  # noqa: F401
        import pybreaker  # noqa: F401
        import tenacity  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: pip install -e '.[bench]'"
    return None


def run_throughput(args: argparse.Namespace, redis_url: str, workdir: Path) -> list[ThroughputRun]:
    stacks = [BARE, *(BY_NAME[name] for name in args.stacks)]
    runs = []
    for rep in range(args.repetitions):
        for pool in args.pools:
            for stack in stacks:
                run = measure_throughput(
                    stack,
                    pool,
                    concurrency(pool),
                    args.tasks,
                    rep,
                    redis_url,
                    workdir,
                    args.log_level,
                )
                runs.append(run)
                print(
                    f"  rep {rep + 1}/{args.repetitions} {pool:8} {stack.name:9}"
                    f" {run.rate:8.1f} tasks/s"
                    f"  {run.rt_per_task(run.sync_round_trips):6.2f} sync rt/task"
                    f"  {run.per_task(run.producer_round_trips):5.2f} producer rt/task",
                    flush=True,
                )
    return runs


def run_utilisation(args: argparse.Namespace, redis_url: str, workdir: Path) -> list[Utilisation]:
    results = []
    for feed in args.utilisation_feeds:
        u = measure_utilisation(
            redis_url,
            workdir,
            feed=feed,
            rate=args.utilisation_rate,
            burst=args.utilisation_burst,
            window_seconds=args.utilisation_seconds,
            overload=args.utilisation_overload,
            workers=args.utilisation_workers,
            # INFO whatever --log-level says: readiness is read from the worker's log.
            concurrency=args.utilisation_concurrency,
            log_level="INFO",
        )
        results.append(u)
        print(
            f"  utilisation {feed:6} {u.admitted} started / {u.allowed:g} allowed"
            f" = {u.ratio:.3f}; densest second {u.densest_second()}",
            flush=True,
        )
    return results


def verdicts(
    throughput: dict[str, dict[str, Any]],
    utilisation: list[dict[str, Any]],
    latency: dict[str, Any] | None,
) -> list[str]:
    """The issue's "how we will know" bench bullet, line by line."""

    def mark(ok: bool | None) -> str:
        return "" if ok is None else ("ok" if ok else "MISSED")

    lines = ["== issue 3 bench: verdicts =="]
    for pool, by_stack in throughput.items():
        for stack, s in by_stack.items():
            sync_added = s["sync_round_trips_added_per_task"]
            producer_added = s["producer_round_trips_added_per_task"]
            if s["target_ratio"] is not None:
                lines.append(
                    f"{stack} vs bare, {pool}: throughput {s['median_ratio']:.3f}"
                    f" (>= {s['target_ratio']} {mark(s['meets_throughput_target'])});"
                    f" sync round trips added {sync_added:+.2f}, producer {producer_added:+.2f}"
                    f" (<= {report.MAX_ADDED_ROUND_TRIPS} {mark(s['meets_round_trip_target'])})"
                )
            else:
                lines.append(
                    f"{stack} vs bare, {pool}: throughput {s['median_ratio']:.3f};"
                    f" round trips added {sync_added + producer_added:+.2f} per task"
                    f" ({sync_added:+.2f} worker, {producer_added:+.2f} producer)"
                    f" (issue: {OFFSHELF_REFERENCE['round_trips_per_task']} round trips,"
                    f" {OFFSHELF_REFERENCE['solo_ratio'][0]}-{OFFSHELF_REFERENCE['solo_ratio'][1]}"
                    " of bare solo)"
                )
    for u in utilisation:
        lines.append(
            f"utilisation of a {u['rate_per_second']:g}/s global limit ({u['feed']},"
            f" {u['workers']} prefork workers x {u['concurrency']}):"
            f" {u['started_in_window']}/{u['allowed_in_window']:g} = {u['utilisation']:.3f}"
            f" (>= {UTILISATION_TARGET} {mark(u['utilisation'] >= UTILISATION_TARGET)});"
            f" densest second {u['densest_second']} (<= {u['densest_second_allowed']:g}"
            f" {mark(u['densest_second'] <= u['densest_second_allowed'])})"
        )
        lines.append(f"    starts per second: {u['per_second']}")
    if latency is not None:
        a, s = latency["admission_us"], latency["set_us"]
        lines.append(
            f"admission latency p99 {a['p99']} us vs SET p99 {s['p99']} us:"
            f" {latency['p99_ratio']:.2f}x (<= {TARGET_P99_RATIO} {mark(latency['meets_target'])});"
            f" p50 {a['p50']} vs {s['p50']} us, p99.9 {a['p99.9']} vs {s['p99.9']} us"
        )
        for name, q in latency["series_us"].items():
            lines.append(
                f"    {name:40} p50 {q['p50']:8.1f}  p90 {q['p90']:8.1f}"
                f"  p99 {q['p99']:8.1f}  p99.9 {q['p99.9']:8.1f} us"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    missing = offshelf_missing() if "offshelf" in args.stacks else None
    if missing:
        print(f"skipping the off-the-shelf stack: {missing}")
        args.stacks.remove("offshelf")
    private = PrivateRedis().start() if args.private_redis else None
    redis_url = private.url if private else args.redis_url
    workdir = Path(tempfile.mkdtemp(prefix="bench-guards-"))
    runs: list[ThroughputRun] = []
    utilisation: list[Utilisation] = []
    latency: Latency | None = None
    try:
        problems = check_parity(redis_url)
        if problems:
            print("bench.bare_app no longer matches worker.app:\n  " + "\n  ".join(problems))
            return 1
        meta: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "redis": server_info(redis_url),
            "commit": _git_commit(),
            "host": platform.node(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "offshelf_skipped": missing,
        }
        if args.latency_iterations > 0:
            print(f"admission latency: {args.latency_iterations} admission/SET pairs", flush=True)
            latency = measure_latency(redis_url, args.latency_iterations, args.latency_warmup)
        if args.stacks:
            print(
                f"throughput: {args.repetitions} repetitions x {args.pools},"
                f" bare vs {args.stacks}, {args.tasks} tasks per run, redis {redis_url}",
                flush=True,
            )
            runs = run_throughput(args, redis_url, workdir)
        if args.utilisation_feeds:
            utilisation = run_utilisation(args, redis_url, workdir)
    except BaseException:
        print(f"bench failed; worker logs are kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if private is not None:
            private.stop()
    names = roundtrips.script_names()
    throughput: dict[str, dict[str, Any]] = {}
    for pool in args.pools:
        for stack in args.stacks:
            s = report.summarize_pool(runs, pool, names, stack=stack, targeted=COMPARED[stack])
            if s is not None:
                throughput.setdefault(pool, {})[stack] = s
    util = [u.as_dict() for u in utilisation]
    lat = latency.as_dict() if latency else None
    meta["load_average_at_end"] = os.getloadavg()
    meta["elapsed_seconds"] = round(time.time() - started, 1)
    document = {
        "meta": meta,
        "targets": {
            "throughput_ratio": report.THROUGHPUT_TARGETS,
            "max_added_round_trips_per_task": report.MAX_ADDED_ROUND_TRIPS,
            "utilisation": UTILISATION_TARGET,
            "admission_p99_over_set_p99": TARGET_P99_RATIO,
            "offshelf_reference": OFFSHELF_REFERENCE,
        },
        "summary": {"throughput": throughput, "utilisation": util, "latency": lat},
        "runs": [r.as_dict(names) for r in runs],
    }
    output = args.output or RESULTS_DIR / f"guards-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.write(output, document)
    print()
    for by_stack in throughput.values():
        for s in by_stack.values():
            print("\n".join(report.pool_lines(s)))
    print("\n".join(verdicts(throughput, util, lat)))
    print(f"\nwritten to {output} ({meta['elapsed_seconds']} s)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
