"""Every ``reliable ...`` example in the README runs, against a real Redis and worker.

The README's ```sh blocks are parsed: ``RELIABLE_*=...`` assignments in them configure
the environment (so ``per-tenant`` exists as the README configures it), and each line
starting with ``reliable `` is run in order — ``<id>`` replaced by a real DLQ entry's id,
confirmations answered ``yes``. ``reliable run`` is exercised by ``tests/test_run.py``.
Each must exit 0, print something, no traceback, and print times as ISO-8601 UTC only.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator

import pytest

from reliability.dlq import DeadLetterQueue
from reliability.ledger import Ledger
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import ROOT, Environment, WorkerProcess, wait_until

README = ROOT / "README.md"
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
# What a time printed some other way looks like: a Unix time, a stream id.
EPOCH = re.compile(r"(?<![\w.])1[6-9]\d{8}(\.\d+)?(?![\w])|\b\d{13}-\d+\b")
SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)


def readme_blocks() -> list[str]:
    return SH_BLOCK.findall(README.read_text())


def readme_settings() -> dict[str, str]:
    """``RELIABLE_X='...'`` assignments in the README's sh blocks (values may span lines)."""
    settings: dict[str, str] = {}
    for block in readme_blocks():
        for token in shlex.split(block, comments=True):
            name, sep, value = token.partition("=")
            # A value the shell expands ("$TOKEN") is an example to type, not configuration.
            if sep and re.fullmatch(r"RELIABLE_[A-Z0-9_]+", name) and "$" not in value:
                settings[name] = value
    return settings


def readme_commands() -> list[list[str]]:
    commands = []
    for block in readme_blocks():
        for line in block.splitlines():
            if line.startswith("reliable ") and not line.startswith("reliable run"):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def reliable(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, stdin="yes\n")


# Output each command must show, beyond the checks every command gets.
EXPECTED = {
    ("breakers", "list"): r"payment +closed +mode=normal +open_until=-",
    ("breakers", "mode"): r"payment +(open|closed) +mode=(forced_open|normal)",
    ("limits", "list"): r"payment-gateway +gcra +rate=\d+/s burst=\d+ +per=global",
    ("limits", "set"): r"payment-gateway +gcra +rate=20/s burst=30 +per=global"
    r"  \(set at runtime; settings: rate=10/s burst=15\)",
    ("limits", "reset"): r"per-tenant scope=acme: usage reset",
    ("dlq", "list"): rf"[0-9a-f]{{32}}  {ISO}  poison +payments\.charge|^\[",
    ("dlq", "show"): rf'"last_failure_at": "{ISO}"',
    ("dlq", "retry"): r"re-enqueued",
    ("dlq", "purge"): r"deleted \d+",
    ("dlq", "count"): r"^\d+$",
    ("dlq", "reprocess"): r"^reprocess \(dry run\): \d+ entries|^\{",
    ("ledger",): rf"^{ISO}  (succeeded|dead_lettered)",
}


@pytest.fixture(scope="module")
def readme_env(shared_env: Environment) -> Iterator[dict[str, str]]:
    """A worker on the README's settings that has dead-lettered one poison charge and
    run one task, so the DLQ and the ledger have something to show."""
    settings = readme_settings()
    assert {"RELIABLE_RATE_LIMITS", "RELIABLE_BREAKERS"} <= set(settings)
    env = shared_env.env(**settings)
    with WorkerProcess(shared_env, concurrency=1, **settings):
        producer = shared_env.producer()
        producer.send_task(
            "payments.charge", kwargs={"payment_id": "pay-readme", "amount": -1, "currency": "EUR"}
        )
        assert producer.send_task("test.echo", args=["hi"]).get(timeout=30) == "hi"
        store = Store(shared_env.redis_url, shared_env.prefix)
        wait_until(lambda: DeadLetterQueue(store).count() == 1, 30, message="poison charge")
        yield env


def test_the_readme_shows_the_operator_commands() -> None:
    commands = [" ".join(c[:2]) for c in readme_commands()]
    for expected in (
        "breakers list",
        "limits list",
        "limits set",
        "limits reset",
        "dlq list",
        "dlq show",
        "dlq retry",
        "dlq purge",
        "dlq count",
        "ledger -n",
    ):
        assert expected in commands, f"README lost its `reliable {expected}` example"


def test_every_reliable_command_in_the_readme_runs(
    readme_env: dict[str, str], shared_env: Environment
) -> None:
    store = Store(shared_env.redis_url, shared_env.prefix)
    [entry] = DeadLetterQueue(store).page()
    assert Ledger(store).tail(1)
    ran = []
    for words in readme_commands():
        args = [entry.id if w == "<id>" else w for w in words]
        done = reliable(readme_env, *args)
        shown = f"`reliable {' '.join(args)}` -> {done.returncode}\n{done.stdout}{done.stderr}"
        assert done.returncode == 0, shown
        assert done.stdout.strip() and "Traceback" not in shown, shown
        assert done.stderr == "", shown
        assert not EPOCH.search(done.stdout), f"a time not in ISO-8601: {shown}"
        key = tuple(words[:2]) if tuple(words[:2]) in EXPECTED else tuple(words[:1])
        if key in EXPECTED:
            assert re.search(EXPECTED[key], done.stdout, re.M), shown
        if words[:2] == ["dlq", "list"] and "--json" in words:
            json.loads(done.stdout)
        ran.append(args)
    assert len(ran) == len(readme_commands()) >= 15
