"""Settings and task declarations fail early, with a message that says what to fix.

Bad environment values are tried the way a deployment meets them: a fresh interpreter
reading the settings (or importing the worker app) must exit non-zero naming the
variable and what it expects. Defaults per environment and the secret collection are
checked in-process on a clean environment; task options on a throwaway Celery app.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from pydantic import BaseModel

from config import Settings, SettingsError, load_settings
from reliability.errors import ConfigurationError
from reliability.retry import RetryPolicy
from reliability.security import Masker
from reliability.task import ReliableTask

ROOT = Path(__file__).resolve().parents[1]
LOAD_SETTINGS = "from config import load_settings; load_settings()"
IMPORT_APP = "import worker.app"


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with only the given RELIABLE_ variables (no .env in ``cwd``)."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELIABLE_")}
    clean["PYTHONPATH"] = str(ROOT)
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=clean, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No RELIABLE_ variables and no .env file: only what the test sets."""
    for name in list(os.environ):
        if name.upper().startswith("RELIABLE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield monkeypatch


# -- bad values stop the process ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"RELIABLE_DLQ__MAX_ENTRIES": "abc"},
            ["RELIABLE_DLQ__MAX_ENTRIES: Input should be a valid integer", "(got 'abc')"],
        ),
        (
            {"RELIABLE_RETRY__JITTER": "bogus"},
            ["RELIABLE_RETRY__JITTER: Input should be 'none', 'full' or 'equal'", "(got 'bogus')"],
        ),
        (
            {"RELIABLE_WORKER__CONCURRENCY": "0"},
            ["RELIABLE_WORKER__CONCURRENCY: Input should be greater than or equal to 1"],
        ),
        (
            {"RELIABLE_ENVIRONMENT": "staging"},
            ["RELIABLE_ENVIRONMENT: Input should be 'development', 'testing' or 'production'"],
        ),
        ({"RELIABLE_ENVIRONMENT": "production"}, ["production needs RELIABLE_REDIS__URL"]),
        (
            {"RELIABLE_BROKER__VISIBILITY_TIMEOUT_SECONDS": "300"},
            [
                "RELIABLE_BROKER__VISIBILITY_TIMEOUT_SECONDS (300) must exceed the longest task",
                "RELIABLE_WORKER__DEFAULT_TIME_LIMIT_SECONDS=330",
            ],
        ),
        (
            {"RELIABLE_IDEMPOTENCY__RESULT_TTL_SECONDS": "3000"},
            ["RELIABLE_IDEMPOTENCY__RESULT_TTL_SECONDS must exceed the broker visibility timeout"],
        ),
        (
            {"RELIABLE_WORKER__TASK_MODULES": "tasks.a,tasks.b"},
            ["RELIABLE_WORKER__TASK_MODULES:", "must be JSON"],
        ),
    ],
    ids=[
        "not-an-int",
        "unknown-jitter",
        "below-minimum",
        "unknown-environment",
        "production-without-redis",
        "visibility-below-time-limit",
        "result-ttl-too-short",
        "list-not-json",
    ],
)
def test_a_bad_value_exits_naming_the_variable_and_what_it_expects(
    tmp_path: Path, env: dict[str, str], expected: list[str]
) -> None:
    result = run_python(LOAD_SETTINGS, tmp_path, **env)
    assert result.returncode == 1
    assert result.stderr.startswith("invalid configuration:\n")
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_importing_the_worker_app_with_bad_values_names_every_one(tmp_path: Path) -> None:
    result = run_python(
        IMPORT_APP, tmp_path, RELIABLE_DLQ__MAX_ENTRIES="abc", RELIABLE_RETRY__JITTER="bogus"
    )
    assert result.returncode == 1
    assert "RELIABLE_DLQ__MAX_ENTRIES: Input should be a valid integer" in result.stderr
    assert "RELIABLE_RETRY__JITTER: Input should be 'none', 'full' or 'equal'" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_settings_raises_a_system_exit_in_process(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELIABLE_LEDGER__MAX_LEN", "10")
    with pytest.raises(SettingsError, match="RELIABLE_LEDGER__MAX_LEN: Input should be greater"):
        load_settings()


# -- defaults per environment ------------------------------------------------------------


def test_development_is_the_default_and_logs_for_humans(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.environment == "development"
    assert settings.log.json_output is False
    assert settings.retry.base_delay_seconds == 0.5
    assert settings.idempotency.lease_ttl_seconds == 30.0


def test_testing_runs_without_jitter_and_with_short_leases(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELIABLE_ENVIRONMENT", "testing")
    settings = load_settings()
    assert settings.retry.jitter == "none"
    assert (settings.retry.base_delay_seconds, settings.retry.max_delay_seconds) == (0.2, 2.0)
    assert settings.idempotency.lease_ttl_seconds == 10.0
    assert settings.idempotency.result_ttl_seconds == 7200
    assert settings.log.level == "DEBUG"


def test_production_logs_json_with_full_jitter(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELIABLE_ENVIRONMENT", "production")
    clean_env.setenv("RELIABLE_REDIS__URL", "redis://:a-long-redis-password@redis:6379/0")
    settings = load_settings()
    assert settings.log.json_output is True
    assert settings.retry.jitter == "full"
    assert settings.idempotency.lease_ttl_seconds == 60.0


def test_explicit_values_win_over_environment_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RELIABLE_ENVIRONMENT", "testing")
    clean_env.setenv("RELIABLE_RETRY__JITTER", "equal")
    settings = load_settings()
    assert settings.retry.jitter == "equal"
    assert settings.retry.base_delay_seconds == 0.2  # the rest of the group keeps its default
    clean_env.setenv("RELIABLE_ENVIRONMENT", "development")
    clean_env.setenv("RELIABLE_LOG__JSON_OUTPUT", "true")
    assert load_settings().log.json_output is True
    overridden = load_settings(environment="testing", idempotency={"lease_ttl_seconds": 3})
    assert overridden.idempotency.lease_ttl_seconds == 3.0
    assert overridden.idempotency.result_ttl_seconds == 7200


def test_secret_values_collects_every_secret_and_url_password(
    clean_env: pytest.MonkeyPatch,
) -> None:
    redis_url = "redis://:r3dis-pass@redis:6379/0"
    broker_url = "amqp://app:mq-passw0rd@rabbit:5672//"
    api_key = "sk_live_1234567890abcdef"
    settings = Settings(
        environment="testing",
        redis={"url": redis_url},
        broker={"url": broker_url},
        providers={"payment_api_key": api_key, "notification_api_key": ""},
    )
    secrets = settings.secret_values()
    assert sorted(secrets) == sorted([redis_url, broker_url, api_key, "r3dis-pass", "mq-passw0rd"])
    assert [len(s) for s in secrets] == sorted((len(s) for s in secrets), reverse=True)
    assert "r3dis-pass" not in repr(settings)
    masked = Masker(secrets).text(f"connect {redis_url}; key={api_key}; pw mq-passw0rd")
    assert masked == "connect ***; key=***; pw ***"


# -- task declarations -------------------------------------------------------------------


@pytest.fixture
def app() -> Celery:
    """A throwaway, finalized app: declarations are checked when decorated."""
    celery = Celery("t", set_as_current=False)
    celery.finalize()
    return celery


def declare(app: Celery, **options: Any) -> Callable[..., Any]:
    """Declare ``charge(payment_id, amount)`` as a ReliableTask (never a shared task)."""

    def charge(payment_id: str, amount: int) -> int:
        return amount

    return app.task(base=ReliableTask, name="t.charge", shared=False, **options)(charge)


def test_a_misspelt_option_fails_at_decoration_with_a_hint(app: Celery) -> None:
    with pytest.raises(
        ConfigurationError, match="unknown option 'idempotency_tll'; did you mean 'idempotency_ttl'"
    ):
        declare(app, idempotency_tll=5)
    with pytest.raises(ConfigurationError, match=r"unknown option 'frobnicate'$"):
        declare(app, frobnicate=True)


def test_a_misspelt_option_on_a_lazy_app_fails_when_the_app_is_finalized() -> None:
    lazy = Celery("t", set_as_current=False)
    declare(lazy, lease_tll=5)
    with pytest.raises(ConfigurationError, match="did you mean 'lease_ttl'"):
        lazy.finalize()


@pytest.mark.parametrize(
    ("option", "value", "advice"),
    [
        ("autoretry_for", (ValueError,), "use retry_policy"),
        ("rate_limit", "10/s", "Celery's rate_limit is per worker; use the fleet-wide limiter"),
    ],
)
def test_celery_options_that_bypass_the_pipeline_are_refused(
    app: Celery, option: str, value: Any, advice: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"task t.charge: {option} — {re.escape(advice)}"):
        declare(app, **{option: value})


def test_idempotency_key_args_must_name_parameters(app: Celery) -> None:
    with pytest.raises(
        ConfigurationError, match=r"idempotency_key_args \['order_id'\] are not parameters"
    ):
        declare(app, idempotency_key_args=("payment_id", "order_id"))


def test_guard_options_must_have_the_right_type(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="retry_policy must be a RetryPolicy"):
        declare(app, retry_policy={"max_attempts": 3})
    with pytest.raises(ConfigurationError, match="args_model must be a pydantic model class"):
        declare(app, args_model=dict)


def test_a_valid_declaration_keeps_its_guard_options(app: Celery) -> None:
    class ChargeArgs(BaseModel):
        payment_id: str
        amount: int

    policy = RetryPolicy(max_attempts=3)
    task = declare(
        app,
        idempotency_key_args=("payment_id",),
        idempotency_ttl=600,
        retry_policy=policy,
        args_model=ChargeArgs,
        dependency="payments",
    )
    assert isinstance(task, ReliableTask)
    assert task.keyed and task.tag == "payments"
    assert (task.idempotency_ttl, task.retry_policy, task.args_model) == (600, policy, ChargeArgs)
    assert task.acks_late and task.reject_on_worker_lost
