"""Configured secrets stay masked on the less obvious paths.

1. The raw body of a message the consumer cannot decode (a refused pickle) is kept in the
   DLQ entry with secrets masked before it is base64-encoded.
2. A chained cause (``raise X(...) from err``) holding a secret: the whole exception chain
   is masked before Celery stores its traceback in the result backend.
3. A secret that JSON escapes (quotes, non-ASCII) is masked in rendered log lines.

The task below is registered only inside the worker this test starts (``REVIEW_TASKS``).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest
import redis

from reliability.dlq import DeadLetterQueue
from reliability.store import Store
from tests.support.fleet import Environment, WorkerProcess, task_modules, wait_until

SECRET = "sk_live_review_0123456789abcdef"

if os.environ.get("REVIEW_TASKS") == __name__:
    from reliability import ReliableTask, RetryPolicy, TransientError
    from worker.app import app, settings

    @app.task(
        base=ReliableTask,
        name="review.chained_secret",
        retry_policy=RetryPolicy(strategy="fixed", base_delay=0.1, max_attempts=1, jitter="none"),
    )
    def chained_secret(note: str) -> str:
        key = settings.providers.payment_api_key
        value = key.get_secret_value() if key is not None else ""
        try:
            raise RuntimeError(f"provider said: bad key {value}")
        except RuntimeError as exc:
            raise TransientError(f"provider refused the call ({note})") from exc


@pytest.fixture
def worker(environment: Environment) -> Iterator[WorkerProcess]:
    modules = task_modules("tests.support.tasks", __name__)
    with WorkerProcess(
        environment,
        concurrency=1,
        REVIEW_TASKS=__name__,
        RELIABLE_WORKER__TASK_MODULES=modules,
        RELIABLE_PROVIDERS__PAYMENT_API_KEY=SECRET,
    ) as process:
        yield process


def test_a_refused_pickle_carrying_a_secret_keeps_no_recoverable_copy_in_the_dlq(
    worker: WorkerProcess, environment: Environment, store: Store
) -> None:
    pickler = environment.producer()
    pickler.conf.update(accept_content=["json", "pickle"], task_serializer="pickle")
    sent = pickler.send_task("test.echo", args=[f"card token {SECRET}"], serializer="pickle")
    dlq = DeadLetterQueue(store)
    wait_until(
        lambda: [e for e in dlq.page() if e.task_id == sent.id],
        20,
        message="the pickle dead-lettered",
    )
    entry = next(e for e in dlq.page() if e.task_id == sent.id)
    raw = base64.b64decode(entry.raw_body or "")
    assert SECRET.encode() not in raw, "the DLQ entry's raw_body decodes to the secret"


def test_a_chained_cause_holding_a_secret_is_masked_in_the_result_backend(
    worker: WorkerProcess, environment: Environment, store: Store
) -> None:
    sent = environment.producer().send_task("review.chained_secret", args=["n"])
    sent.get(timeout=30, propagate=False)
    wait_until(lambda: DeadLetterQueue(store).page(), 20, message="dead-lettered")
    client = redis.Redis.from_url(environment.redis_url)
    meta = client.get(f"{environment.broker_prefix}celery-task-meta-{sent.id}") or b""
    assert SECRET not in worker.log_text()  # logs are masked
    assert SECRET not in DeadLetterQueue(store).page()[0].traceback  # so is the DLQ
    assert SECRET.encode() not in meta, "the stored FAILURE traceback holds the secret"


def test_a_secret_that_json_escapes_is_still_masked_in_log_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Masker.rendered runs on the rendered JSON line, where json.dumps has already escaped
    # non-ASCII characters, quotes and backslashes: such a secret no longer matches.
    import logging

    import structlog

    from reliability.logs import configure_logging
    from reliability.security import Masker

    secret = 'pässwörd"1234'
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO", True, Masker([secret]))
    try:
        structlog.get_logger("review").error("provider_failed", error=f"auth {secret} refused")
        line = capsys.readouterr().err
    finally:
        root.handlers, level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    assert 'p\\u00e4ssw\\u00f6rd\\"1234' not in line, line
