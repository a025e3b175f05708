"""``reliable degradation``: show, set and clear the override, as an operator runs it.

Bad arguments are one line on stderr, exit 2, and change nothing (checked in process:
argparse refuses them before any store is touched). The happy path runs ``reliable``
subprocesses against a real Redis under the test's own prefix: the override is what
the admission script then applies, and clear hands the level back to the rules.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from reliability.degradation import DegradationState, Level
from reliability.store import Store
from tests.support.cli import reliable as run_cli
from tests.support.fleet import Environment
from worker.degradation_cli import main

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["set", "SEVER", "--reason", "r"], r"invalid choice: 'SEVER' \(choose from 'NORMAL'"),
        (["set", "SEVERE"], r"the following arguments are required: --reason"),
        (["set", "SEVERE", "--reason", "r", "--expires-minutes", "0"], r"a number above 0"),
        (["set", "SEVERE", "--reason", "r", "--expires-minutes", "x"], r"a number above 0"),
        (["set", "SEVERE", "--reason", "r", "--by", " "], r"must not be empty"),
        (["panic"], r"invalid choice: 'panic'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    args: list[str], pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert re.search(rf"^reliable degradation( set)?: error: .*{pattern}", err)


def reliable(env: Environment, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "degradation", *args)


def test_set_show_clear(cli_env: Environment) -> None:
    store = Store(cli_env.redis_url, cli_env.prefix)
    empty = reliable(cli_env)
    assert (empty.returncode, empty.stderr) == (0, "")
    assert empty.stdout.splitlines()[0] == "level      NORMAL"

    done = reliable(
        cli_env, "set", "critical", "--reason", "drill", "--expires-minutes", "2", "--by", "bob"
    )
    assert (done.returncode, done.stderr) == (0, ""), done
    assert re.search(rf"^override   CRITICAL by bob until {ISO}: drill$", done.stdout, re.M)
    assert DegradationState(store).status().level is Level.CRITICAL

    shown = json.loads(reliable(cli_env, "show", "--json").stdout)
    override = shown.pop("override")
    assert shown == {
        "level": "CRITICAL",
        "computed": None,
        "reason": "",
        "since": shown["since"],
        "evaluated_at": None,
    }
    assert re.fullmatch(ISO, shown["since"]) and re.fullmatch(ISO, override.pop("expires"))
    assert override == {"level": "CRITICAL", "reason": "drill", "by": "bob", "active": True}

    cleared = reliable(cli_env, "clear", "--json")
    assert cleared.returncode == 0 and json.loads(cleared.stdout)["override"] is None
    status = DegradationState(store).status()
    assert (status.level, status.override) == (Level.NORMAL, None)
