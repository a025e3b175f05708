"""``reliable``: run the service, and look after it.

``reliable run`` starts everything a developer needs on a fresh machine: the embedded
Redis when no URL is configured, the sandbox provider (development only, when the
providers point at it), a worker and beat. Ctrl-C (or SIGTERM) stops them with a warm
shutdown, so running tasks finish and nothing is lost. ``reliable dlq ...`` is the
dead-letter queue CLI; ``reliable ledger`` tails the outcome ledger.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from config import Environment, load_settings
from worker.embedded import ensure_embedded_redis

SANDBOX_DEFAULT = "http://127.0.0.1:8099"


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *args], env=env)


def run(concurrency: int | None, with_beat: bool, with_sandbox: bool) -> int:
    settings = load_settings()
    env = dict(os.environ)
    if settings.redis.url is None:
        url = ensure_embedded_redis(settings.redis.data_dir)
        env["RELIABLE_REDIS__URL"] = url
        print(f"embedded redis (AOF, appendfsync always): {url}", flush=True)
    children: list[subprocess.Popen[bytes]] = []
    if (with_sandbox and settings.environment is Environment.DEVELOPMENT
            and settings.providers.payment_base_url == SANDBOX_DEFAULT):
        children.append(_spawn(["worker.sandbox", "--port", "8099"], env))
    worker = ["celery", "-A", "worker.app", "worker", "-l", settings.log.level]
    if concurrency:
        worker += ["-c", str(concurrency)]
    children.append(_spawn(worker, env))
    if with_beat:
        children.append(_spawn(["celery", "-A", "worker.app", "beat", "-l", "INFO"], env))

    def stop(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = 0
    for child in children:
        code = code or (child.wait() or 0)
    return code


def tail_ledger(count: int) -> int:
    from worker.app import runtime

    for row in reversed(runtime.ledger.tail(count)):
        print(f"{row['id']}  {row.get('outcome', ''):<18} {row.get('task', ''):<22} "
              f"{row.get('task_id', '')}  attempt={row.get('attempt', '')} "
              f"{row.get('detail', '')}")
    return 0


def breakers(action: str, name: str | None, mode: str | None) -> int:
    from reliability.breaker import BreakerMode
    from worker.app import runtime

    if action == "list":
        for breaker in runtime.breakers:
            snap = breaker.snapshot()
            state = "open" if snap["mode"] == "forced_open" else snap["state"]
            print(f"{snap['name']:<16} {state:<10} mode={snap['mode']:<12} "
                  f"open_until={snap['open_until'] or '-'}")
        return 0
    if not name:
        print("a breaker name is required", file=sys.stderr)
        return 2
    breaker = runtime.breakers.get(name)
    if action == "reset":
        breaker.reset()
    else:
        breaker.set_mode(BreakerMode(mode or "normal"))
    print(breaker.snapshot())
    return 0


def limits(action: str, name: str | None, scope: str, values: dict[str, float | None]) -> int:
    from reliability.ratelimit import RateLimiter
    from worker.app import runtime

    if action == "list":
        for limit in runtime.rate_limits.values():
            print(f"{limit.name:<24} {limit.kind:<12} per={limit.per:<8} params={limit.params}")
        return 0
    if not name:
        print("a rate limit name is required", file=sys.stderr)
        return 2
    limiter = RateLimiter(runtime.store, runtime.rate_limit(name), scope=scope)
    if action == "reset":
        limiter.reset()
    else:
        limiter.set_rate(values.get("rate"), values.get("burst"),  # type: ignore[arg-type]
                         max_requests=values.get("max_requests"),  # type: ignore[arg-type]
                         window_seconds=values.get("window_seconds"),
                         limit=values.get("limit"))  # type: ignore[arg-type]
    print(f"{name}[{scope}]: available {limiter.available_tokens:.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliable", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="worker + beat (+ embedded redis and sandbox)")
    p_run.add_argument("-c", "--concurrency", type=int)
    p_run.add_argument("--no-beat", action="store_true")
    p_run.add_argument("--no-sandbox", action="store_true")
    sub.add_parser("dlq", help="the dead-letter queue CLI (see reliable dlq --help)",
                   add_help=False)
    p_ledger = sub.add_parser("ledger", help="the last outcomes")
    p_ledger.add_argument("-n", "--count", type=int, default=50)
    p_cb = sub.add_parser("breakers", help="list, reset or set the mode of circuit breakers")
    p_cb.add_argument("action", choices=["list", "reset", "mode"])
    p_cb.add_argument("name", nargs="?")
    p_cb.add_argument("mode", nargs="?", choices=["normal", "forced_open", "disabled", "shadow"])
    p_rl = sub.add_parser("limits", help="list rate limits, change one at runtime, reset one")
    p_rl.add_argument("action", choices=["list", "set", "reset"])
    p_rl.add_argument("name", nargs="?")
    p_rl.add_argument("--scope", default="-", help="tenant/user/... value, '-' for global")
    for option in ("rate", "burst", "max-requests", "window-seconds", "limit"):
        p_rl.add_argument(f"--{option}", type=float)
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        return run(args.concurrency, not args.no_beat, not args.no_sandbox)
    if args.command == "dlq":
        from worker.dlq_cli import main as dlq_main

        return dlq_main(rest)
    if args.command == "ledger":
        return tail_ledger(args.count)
    if args.command == "breakers":
        return breakers(args.action, args.name, args.mode)
    if args.command == "limits":
        values = {"rate": args.rate, "burst": args.burst and int(args.burst),
                  "max_requests": args.max_requests and int(args.max_requests),
                  "window_seconds": args.window_seconds,
                  "limit": args.limit and int(args.limit)}
        return limits(args.action, args.name, args.scope, values)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
