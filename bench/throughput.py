"""``python -m bench.throughput``: bare Celery vs the reliable stack, in one run.

For each repetition and pool (solo, prefork) a bare run and a reliable run are measured
back to back (interleaved pairs), then the revival after a pool-child kill is timed for
both stacks. Prints a table and writes the same numbers to ``bench/results/<time>.json``.
``--quick`` finishes in one to two minutes; the defaults take several.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report, roundtrips
from bench.runs import Revival, RevivalRig, ThroughputRun, measure_throughput
from bench.stack import BARE, DEFAULT_REDIS_URL, RELIABLE, PrivateRedis, check_parity, server_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFORK_CONCURRENCY = 2
FULL = {"tasks": 2000, "repetitions": 5, "revival_repetitions": 5}
QUICK = {"tasks": 300, "repetitions": 5, "revival_repetitions": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"fewer tasks and repetitions ({QUICK})")
    p.add_argument("--tasks", type=int, help=f"no-op tasks per run (default {FULL['tasks']})")
    p.add_argument(
        "--repetitions",
        type=int,
        help=f"interleaved pairs per pool (default {FULL['repetitions']}, min 1)",
    )
    p.add_argument(
        "--revival-repetitions",
        type=int,
        help=f"kills per stack (default {FULL['revival_repetitions']}; 0 skips)",
    )
    p.add_argument("--pools", default="solo,prefork", help="comma separated: solo,prefork")
    p.add_argument(
        "--sleep-seconds",
        type=float,
        default=2.0,
        help="how long the revival task sleeps on its first delivery",
    )
    p.add_argument(
        "--revival-jitter",
        type=float,
        default=5.0,
        help="random pause (0..N s) before each kill; 5 s is the period of"
        " Celery's prefork pool maintenance",
    )
    p.add_argument("--seed", type=int, default=2, help="seed of the revival pauses")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    p.add_argument(
        "--private-redis",
        action="store_true",
        help="run on a redis-server of the bench's own (exact commandstats)",
    )
    p.add_argument(
        "--log-level", default="INFO", help="worker log level of the throughput runs (both stacks)"
    )
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/<time>.json)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.pools = [x.strip() for x in args.pools.split(",") if x.strip()]
    unknown = set(args.pools) - {"solo", "prefork"}
    if unknown or args.repetitions < 1 or args.tasks < 1:
        p.error(f"bad --pools {sorted(unknown)}" if unknown else "need >= 1 task and repetition")
    return args


def concurrency(pool: str) -> int:
    return 1 if pool == "solo" else PREFORK_CONCURRENCY


def run_throughput(args: argparse.Namespace, redis_url: str, workdir: Path) -> list[ThroughputRun]:
    runs = []
    for rep in range(args.repetitions):
        for pool in args.pools:
            for stack in (BARE, RELIABLE):
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
                rt = run.rt_per_task(run.steady_round_trips)
                print(
                    f"  rep {rep + 1}/{args.repetitions} {pool:8} {stack.name:9}"
                    f" {run.rate:8.1f} tasks/s  {rt:6.2f} rt/task"
                    f"  {run.per_task(run.commands):6.2f} cmd/task",
                    flush=True,
                )
    return runs


def run_revival(args: argparse.Namespace, redis_url: str, workdir: Path) -> list[Revival]:
    revivals: list[Revival] = []
    if args.revival_repetitions <= 0:
        return revivals
    with (
        RevivalRig(BARE, redis_url, workdir, PREFORK_CONCURRENCY) as bare,
        RevivalRig(RELIABLE, redis_url, workdir, PREFORK_CONCURRENCY) as rel,
    ):
        rng = random.Random(args.seed)
        for rep in range(args.revival_repetitions):
            for rig in (bare, rel):
                pause = rng.uniform(0, args.revival_jitter)
                r = rig.revive_once(rep, args.sleep_seconds, pause)
                revivals.append(r)
                shown = (
                    "not revived"
                    if r.finished is None
                    else (
                        f"noticed {_s(r.noticed)} restart {_s(r.restarted)}"
                        f" finish {_s(r.finished)} (pause {pause:.2f}s)"
                    )
                )
                print(
                    f"  revival {rep + 1}/{args.revival_repetitions} {r.stack:9} {shown}",
                    flush=True,
                )
    return revivals


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}s"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=10,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    private = PrivateRedis().start() if args.private_redis else None
    redis_url = private.url if private else args.redis_url
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        problems = check_parity(redis_url)
        if problems:
            print("bench.bare_app no longer matches worker.app:\n  " + "\n  ".join(problems))
            return 1
        print(
            f"throughput: {args.repetitions} pairs x {args.pools}, {args.tasks} tasks per run,"
            f" redis {redis_url}",
            flush=True,
        )
        meta: dict[str, Any] = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "redis": server_info(redis_url),
            "commit": _git_commit(),
            "host": platform.node(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        }
        runs = run_throughput(args, redis_url, workdir)
        revivals = run_revival(args, redis_url, workdir)
    except BaseException:
        print(f"bench failed; worker logs are kept in {workdir}", file=sys.stderr)
        raise
    finally:
        if private is not None:
            private.stop()
    names = roundtrips.script_names()
    summary: dict[str, Any] = {"pools": {}}
    for pool in args.pools:
        pool_summary = report.summarize_pool(runs, pool, names)
        if pool_summary is not None:
            summary["pools"][pool] = pool_summary
    if revivals:
        summary["revival"] = report.summarize_revival(revivals)
    meta["load_average_at_end"] = os.getloadavg()
    meta["elapsed_seconds"] = round(time.time() - started, 1)
    document = {
        "meta": meta,
        "targets": {
            "throughput_ratio": report.THROUGHPUT_TARGETS,
            "max_added_round_trips_per_task": report.MAX_ADDED_ROUND_TRIPS,
            "goal_added_round_trips_per_task": report.GOAL_ADDED_ROUND_TRIPS,
            "bare_reference": report.BARE_REFERENCE,
        },
        "summary": summary,
        "runs": [r.as_dict(names) for r in runs],
        "revival": [r.as_dict() for r in revivals],
    }
    output = args.output or RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.write(output, document)
    print()
    print(report.table(summary))
    print(f"\nwritten to {output} ({meta['elapsed_seconds']} s)")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
