"""The operator CLI: one-line errors, current limits, ISO-8601 times, the embedded Redis.

Each command runs as an operator runs it: a ``reliable`` subprocess (settings are read
at import) against a real Redis under the test's own key prefix.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reliability.breaker import BreakerConfig, CircuitBreaker, CircuitBreakerError
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import ROOT, Environment
from tests.support.lifecycle import no_url_env, servers_on
from tests.support.redis_server import free_port
from worker import embedded

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def reliable(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args)


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, pattern: str) -> None:
    shown = f"exit {done.returncode}\nstdout: {done.stdout!r}\nstderr: {done.stderr!r}"
    assert done.returncode == code, shown
    assert done.stdout == "" and "Traceback" not in done.stderr, shown
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), shown


ERRORS = [
    (
        ["breakers", "reset", "paymnt"],
        1,
        r"^reliable: error: no circuit breaker named 'paymnt' \(known: analytics, database, "
        r"notification, payment, test-breaker\)$",
    ),
    (
        ["limits", "set", "nope", "--rate", "5"],
        1,
        r"^reliable: error: no rate limit named 'nope' \(known: analytics-export, "
        r"notification-per-user, payment-gateway, test-limit\)$",
    ),
    (["limits", "reset", "nope"], 1, r"no rate limit named 'nope'"),
    (
        ["limits", "set", "payment-gateway", "--max-requests", "3"],
        2,
        r"rate limit payment-gateway is gcra: set --rate and/or --burst$",
    ),
    (["limits", "set", "payment-gateway"], 2, r"is gcra: set --rate and/or --burst$"),
    (
        ["limits", "set", "payment-gateway", "--rate", "0"],
        2,
        r"^reliable limits: error: argument --rate: a number above 0 expected, got '0'",
    ),
    (
        ["limits", "set", "payment-gateway", "--rate", "-5"],
        2,
        r"^reliable limits: error: argument --rate: a number above 0 expected, got '-5'",
    ),
    (
        ["limits", "set", "payment-gateway", "--burst", "0"],
        2,
        r"argument --burst: a whole number of at least 1 expected, got '0'",
    ),
    (
        ["limits", "set", "payment-gateway", "--rate", "fast"],
        2,
        r"^reliable limits: error: argument --rate: a number above 0 expected, got 'fast'",
    ),
    (
        ["limits", "reset", "payment-gateway", "--scope", "acme"],
        1,
        r"rate limit payment-gateway is global: it takes no --scope$",
    ),
    (["limits", "list", "payment-gateway"], 2, r"unrecognized arguments: payment-gateway"),
    (["limits", "reset"], 2, r"limits reset needs a rate limit name"),
    (
        ["breakers", "mode", "payment"],
        2,
        r"breakers mode needs a mode: normal, forced_open, disabled, shadow",
    ),
    (["breakers", "mode", "payment", "sideways"], 2, r"invalid choice: 'sideways'"),
    (["breakers", "reset"], 2, r"breakers reset needs a breaker name"),
    (["frobnicate"], 2, r"^reliable: error: argument command: invalid choice: 'frobnicate'"),
    ([], 2, r"^reliable: error: the following arguments are required: command"),
    (["ledger", "-n", "many"], 2, r"argument -n/--count: a whole number of at least 1 expected"),
    (["ledger", "-n", "-3"], 2, r"argument -n/--count: a whole number of at least 1 expected"),
    (["ledger", "-n", "0"], 2, r"argument -n/--count: a whole number of at least 1 expected"),
    (["run", "-c", "0"], 2, r"argument -c/--concurrency: a whole number of at least 1"),
    (["dlq", "list", "--limit", "-1"], 2, r"argument --limit: a whole number of at least 1"),
    (["dlq", "list", "--offset", "-1"], 2, r"argument --offset: a whole number of at least 0"),
    (["dlq", "list", "--since-minutes", "-5"], 2, r"argument --since-minutes: a number above 0"),
    (["dlq", "purge", "--since-minutes", "nan"], 2, r"argument --since-minutes: a number above"),
    (["ledger", "--since", "1h"], 2, r"unrecognized arguments: --since 1h"),
    (["dlq", "show", "0123abcd"], 1, r"^reliable dlq: error: no DLQ entry 0123abcd$"),
    (["dlq", "retry", "0123abcd"], 1, r"^reliable dlq: error: no DLQ entry 0123abcd$"),
    (["dlq", "retry"], 2, r"^reliable dlq: error: retry needs an entry id or --all"),
    (["dlq", "list", "--class", "bogus"], 2, r"argument --class: invalid choice: 'bogus'"),
    (["jobs", "--job", "nope"], 2, r"argument --job: invalid choice: 'nope'"),
    (["dlq", "frobnicate"], 2, r"^reliable dlq: error: argument command: invalid choice"),
]


@pytest.mark.parametrize(
    ("args", "code", "pattern"), ERRORS, ids=[" ".join(a) or "nothing" for a, _, _ in ERRORS]
)
def test_every_error_is_one_line_on_stderr_with_a_non_zero_exit(
    cli_env: Environment, args: list[str], code: int, pattern: str
) -> None:
    assert_one_line_error(reliable(cli_env.env(), *args), code, pattern)


def test_a_limit_set_the_limit_itself_refuses_is_a_usage_error(cli_env: Environment) -> None:
    costly = '{"costly": {"kind": "gcra", "rate": 5, "burst": 4, "cost": 2}}'
    done = reliable(
        cli_env.env(RELIABLE_RATE_LIMITS=costly), "limits", "set", "costly", "--burst", "1"
    )
    assert_one_line_error(
        done,
        2,
        r"^reliable: error: rate limit costly: cost 2 exceeds what the limit ever "
        r"admits at once \(1\); such a call could never conform$",
    )


def test_a_closed_stdout_ends_a_command_quietly(cli_env: Environment) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "dlq", "list"],
        cwd=ROOT,
        env=cli_env.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert stderr == ""


@pytest.mark.parametrize(
    "args",
    [
        ["breakers", "list"],
        ["limits", "list"],
        ["dlq", "count"],
        ["dlq", "show", "0123"],
        ["ledger"],
    ],
)
def test_an_unreachable_redis_is_one_line_that_never_shows_its_password(
    cli_env: Environment, args: list[str]
) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    done = reliable(cli_env.env(RELIABLE_REDIS__URL=url), *args)
    assert_one_line_error(done, 1, r"^reliable( dlq)?: error: cannot reach Redis: ")
    assert "s3cret-pw" not in done.stderr


def test_limits_list_shows_the_values_in_force_until_a_reset(cli_env: Environment) -> None:
    env = cli_env.env(RELIABLE_RATE_LIMITS='{"payment-gateway": {"rate": 10, "burst": 15}}')

    def listed(name: str) -> str:
        done = reliable(env, "limits", "list")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        [line] = [row for row in done.stdout.splitlines() if row.startswith(name + " ")]
        return " ".join(line.split())

    assert listed("payment-gateway") == "payment-gateway gcra rate=10/s burst=15 per=global"
    assert listed("notification-per-user") == (
        "notification-per-user sliding max_requests=5 window=60s per=user"
    )
    set_gcra = reliable(env, "limits", "set", "payment-gateway", "--rate", "20", "--burst", "30")
    assert set_gcra.returncode == 0, set_gcra.stderr
    set_sliding = reliable(
        env,
        "limits",
        "set",
        "notification-per-user",
        "--max-requests",
        "7",
        "--window-seconds",
        "2.5",
    )
    assert set_sliding.returncode == 0, set_sliding.stderr
    assert listed("payment-gateway") == (
        "payment-gateway gcra rate=20/s burst=30 per=global "
        "(set at runtime; settings: rate=10/s burst=15)"
    )
    assert listed("notification-per-user") == (
        "notification-per-user sliding max_requests=7 window=2.5s per=user "
        "(set at runtime; settings: max_requests=5 window=60s)"
    )
    reset = reliable(env, "limits", "reset", "notification-per-user", "--scope", "u-42")
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.startswith("notification-per-user scope=u-42: usage reset")
    assert listed("notification-per-user") == (
        "notification-per-user sliding max_requests=5 window=60s per=user"
    )
    assert listed("payment-gateway").startswith("payment-gateway gcra rate=20/s burst=30")


def test_breakers_print_when_an_open_breaker_may_half_open_in_iso_8601_utc(
    cli_env: Environment,
) -> None:
    breaker = CircuitBreaker(
        "payment",
        Store(cli_env.redis_url, cli_env.prefix),
        BreakerConfig(failure_threshold=1, recovery_timeout=600),
    )
    with contextlib.suppress(ZeroDivisionError):
        breaker.call(lambda: 1 / 0)
    with pytest.raises(CircuitBreakerError):
        breaker.call(lambda: 1)
    done = reliable(cli_env.env(), "breakers", "list")
    assert done.returncode == 0, done.stderr
    [row] = [line for line in done.stdout.splitlines() if line.startswith("payment ")]
    assert re.fullmatch(rf"payment +open +mode=normal +open_until={ISO}", row), row


def test_a_command_with_no_redis_url_starts_the_embedded_redis_and_stops_it_after(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    done = reliable(no_url_env(data_dir), "dlq", "count")
    assert (done.returncode, done.stdout, done.stderr) == (0, "0\n", "")
    assert (data_dir / "appendonly.aof").exists()  # it did run, on this data directory
    assert not embedded.is_running(data_dir)
    assert servers_on(data_dir) == []


def test_a_command_with_no_redis_url_uses_the_running_embedded_redis_and_leaves_it(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    env = no_url_env(data_dir)
    assert embedded.start_embedded_redis(data_dir)
    try:
        forced = reliable(env, "breakers", "mode", "payment", "forced_open")
        assert forced.returncode == 0, forced.stderr
        listed = reliable(env, "breakers", "list")
        assert re.search(r"^payment +open +mode=forced_open", listed.stdout, re.M), listed.stdout
        assert embedded.is_running(data_dir) and len(servers_on(data_dir)) == 1
    finally:
        embedded.stop_embedded_redis(data_dir)


def test_run_with_flower_but_no_flower_installed_is_a_usage_error(tmp_path: Path) -> None:
    """Flower is an optional extra: without it, `reliable run --flower` says how to get it
    (and starts nothing)."""
    hide_flower = (
        "import sys\n"
        "sys.modules['flower'] = None  # as if not installed\n"
        "from worker.cli import main\n"
        "sys.exit(main(['run', '--flower']))\n"
    )
    data_dir = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-c", hide_flower],
        cwd=ROOT,
        env=no_url_env(data_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "reliable: error: --flower needs Flower: the flower extra (pip install -e '.[flower]')"
        " (see reliable --help)"
    )
    assert not data_dir.exists()
