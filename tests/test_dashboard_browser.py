"""The ops dashboard in headless Chromium (Debian's ``chromium``, driven by Playwright).

Real processes: the ops service, a ``celery worker`` and the sandbox provider. A scripted
outage of the provider trips a breaker and dead-letters a task; the page shows both; the
operator ends the outage, resets the breaker and presses the entry's Retry button; the
redriven task then reaches the provider exactly once. Along the way: a refused token is
shown as such, and hostile text in a DLQ entry is shown as text. Another test opens the
page on 3,000 DLQ entries. Screenshots are saved under ``$RELIABLE_ARTIFACTS`` (default:
the test's tmp dir) and their paths printed.

Playwright never downloads a browser here (``playwright install`` is not run): it
launches /usr/bin/chromium. Without it the tests skip locally and fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.fingerprint import fingerprint
from reliability.ledger import Ledger
from reliability.reports.job import write_report
from reliability.reports.period import Period
from reliability.reports.storage import ReportStore
from reliability.store import Store
from tests.support.fleet import Environment, OpsProcess, WorkerProcess, delete_prefix, wait_until
from tests.support.needs import missing
from worker.sandbox import SandboxProvider

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-browser-token-8b2f4a"
SETTINGS = {
    "RELIABLE_OPS__ADMIN_TOKENS": json.dumps({"alice": TOKEN}),
    # Three consecutive failures open it, and it stays open until reset.
    "RELIABLE_BREAKERS": json.dumps(
        {"test-breaker": {"failure_threshold": 3, "recovery_timeout_seconds": 600}}
    ),
    # The fleet-wide retry budget is not what this test is about: never refuse a retry.
    "RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND": "1000",
}
HOSTILE = '<script>window.__xss = 1</script><img src="x" onerror="window.__xss = 2">'
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("RELIABLE_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    """A new page at ``url``; the returned list collects script errors and CSP refusals."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text} ({msg.location.get('url')})")
            if msg.type == "error" and "status of 403" not in msg.text
            else None
        ),
    )
    page.goto(url)
    return page, problems


def use_token(page: Page, token: str) -> None:
    page.fill("#token", token)
    page.click("#token-save")


def screenshot(page: Page, artifacts: Path, name: str) -> Path:
    path = artifacts / name
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    return path


def test_an_outage_shows_an_open_breaker_and_the_retry_button_redrives_once(
    browser: Browser, redis_url: str, artifacts: Path
) -> None:
    with SandboxProvider() as sandbox:
        env = Environment(redis_url=redis_url, sandbox_url=sandbox.url, extra=SETTINGS)
        try:
            with WorkerProcess(env, concurrency=1, pool="solo"), OpsProcess(env) as ops:
                scenario(browser, env, ops, sandbox, artifacts)
        finally:
            delete_prefix(redis_url, env.prefix)


def scenario(
    browser: Browser, env: Environment, ops: OpsProcess, sandbox: SandboxProvider, artifacts: Path
) -> None:
    store = Store(env.redis_url, env.prefix)
    dlq = DeadLetterQueue(store)
    hostile = DeadLetter(
        task_name="webhooks.deliver",
        task_id=uuid.uuid4().hex,
        failure_class="permanent",
        exception_type="ValueError",
        exception_message=HOSTILE,
    )
    dlq.add(hostile, Ledger(store))

    page, problems = open_page(browser, f"{ops.url}/?refresh=1")
    breaker_row = page.locator('#breakers tr[data-breaker="test-breaker"]')
    # Without a token: the open routes (breakers, workers, DLQ totals) only.
    expect(breaker_row.locator("td.state")).to_have_text("closed", timeout=WAIT_MS)
    expect(page.locator("#auth-state")).to_have_text("no token: health only")
    expect(page.locator("#workers tbody tr")).to_have_count(1)
    expect(page.locator("#workers tbody td.state-closed")).to_have_text("alive")

    # A token the service refuses is shown as refused (and not sent again).
    use_token(page, "not-an-admin-token-at-all")
    expect(page.locator("#banner")).to_contain_text("403 Forbidden", timeout=WAIT_MS)
    expect(page.locator("#auth-state")).to_have_text("token refused (403)")
    use_token(page, TOKEN)
    expect(page.locator("#auth-state")).to_have_text("admin token in use", timeout=WAIT_MS)
    expect(page.locator("#banner")).to_be_hidden()
    # Kept for this tab only, and not left in the field.
    assert page.evaluate("sessionStorage.getItem('reliable-ops-admin-token')") == TOKEN
    assert page.input_value("#token") == ""
    expect(page.locator('#limits tr[data-limit="payment-gateway"]')).to_have_count(1)

    # Hostile text in an entry is shown as text: no script ran, no element was made.
    hostile_row = page.locator(f'#dlq-entries tr[data-entry-id="{hostile.id}"]')
    expect(hostile_row.locator("td.message")).to_have_text(f"ValueError: {HOSTILE}")
    hostile_group = page.locator(f'#dlq-groups tr[data-fingerprint="{hostile.fingerprint}"]')
    expect(hostile_group.locator("td.message")).to_contain_text("<script>")
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img, main script").count() == 0

    # The scripted outage: every call fails, the task runs out of attempts (3) and is
    # dead-lettered, and its 3 consecutive failures open the breaker.
    sandbox.set_faults(outage=True)
    producer = env.producer()
    key = f"dash-{uuid.uuid4().hex[:8]}"
    failed = producer.send_task("test.guarded_call", args=[key])
    with pytest.raises(Exception) as failure:  # the type is asserted by name
        failed.get(timeout=60)
    assert type(failure.value).__name__ == "TransientError"
    [entry] = wait_until(
        lambda: [e for e in dlq.iter() if e.task_id == failed.id], 30, message="dead-lettered"
    )
    expect(breaker_row.locator("td.state")).to_have_text("open", timeout=WAIT_MS)
    expect(breaker_row.locator("td").nth(3)).to_have_text("100.0%")
    entry_row = page.locator(f'#dlq-entries tr[data-entry-id="{entry.id}"]')
    expect(entry_row).to_contain_text("test.guarded_call", timeout=WAIT_MS)
    expect(entry_row.locator("td").nth(2)).to_have_text("transient")
    screenshot(page, artifacts, "dashboard-outage.png")

    # The outage ends; the operator closes the breaker and retries the entry on the page.
    sandbox.set_faults(outage=False)
    breaker_row.get_by_role("button", name="Reset").click()
    expect(page.locator("#notice")).to_have_text(
        "breaker test-breaker: reset done, now closed", timeout=WAIT_MS
    )
    expect(breaker_row.locator("td.state")).to_have_text("closed", timeout=WAIT_MS)
    entry_row.get_by_role("button", name="Retry").click()
    expect(page.locator("#notice")).to_contain_text(f"entry {entry.id} redriven as task")
    notice = page.locator("#notice").text_content() or ""
    redriven = re.sub(r".* redriven as task ", "", notice)
    assert redriven.isalnum() or "-" in redriven
    assert producer.AsyncResult(redriven).get(timeout=60)["status"] == "ok"
    expect(entry_row).to_have_count(0, timeout=WAIT_MS)

    def calls() -> list[dict[str, Any]]:
        return [r for r in sandbox.effects(endpoint="webhooks") if r["body"] == {"key": key}]

    wait_until(lambda: [c for c in calls() if c["status"] == 200], 30, message="the effect")
    assert [c["status"] for c in calls()] == [503, 503, 503, 200]  # the effect: exactly once
    assert Ledger(store).outcomes([redriven])[redriven] == ["succeeded"]
    assert dlq.get(entry.id) is None

    # Reports of the last six hours, written from the ledger as beat's report job does:
    # the charts draw one bar per report, and the success rate where a report has one.
    archive = ReportStore(store)
    hour = time.time() // 3600 * 3600
    for back in range(5, -1, -1):
        start = hour - back * 3600
        write_report(store, archive, Period("hour", start, start + 3600))
    latest = archive.latest("hour")
    assert latest is not None
    rate = latest["totals"]["success_rate"]
    expect(page.locator("#chart-retries rect.bar")).to_have_count(6, timeout=WAIT_MS)
    expect(page.locator("#chart-dlq rect.bar")).to_have_count(6)
    expect(page.locator("#chart-success circle.point")).to_have_count(1)
    expect(page.locator("#chart-success circle.point title")).to_have_text(
        re.compile(rf"success rate: {rate * 100:.1f}%$")
    )
    expect(page.locator("#report-summary")).to_contain_text(
        f"{latest['totals']['retried']} retries"
    )
    expect(page.locator("#updated")).not_to_have_text("never")
    screenshot(page, artifacts, "dashboard-after-retry.png")
    page.click("#token-clear")
    expect(page.locator("#auth-state")).to_have_text("no token: health only")
    assert page.evaluate("sessionStorage.getItem('reliable-ops-admin-token')") is None
    assert problems == []
    page.close()


def test_the_page_stays_usable_on_three_thousand_entries(
    browser: Browser, redis_url: str, artifacts: Path
) -> None:
    env = Environment(redis_url=redis_url, extra=SETTINGS)
    try:
        store = Store(env.redis_url, env.prefix)
        dlq, ledger = DeadLetterQueue(store), Ledger(store)
        # A small group, older than the rest, for the group's "Retry all" button.
        for _ in range(3):
            dlq.add(
                DeadLetter(
                    task_name="exports.run",
                    task_id=uuid.uuid4().hex,
                    failure_class="transient",
                    kwargs={"export_id": uuid.uuid4().hex},
                    exception_type="TimeoutError",
                    exception_message="export storage timed out",
                ),
                ledger,
            )
        added = []
        for i in range(3000):
            message = "answered 503" if i % 3 else "answered 400"
            entry = DeadLetter(
                task_name="exports.run",
                task_id=uuid.uuid4().hex,
                failure_class="transient" if i % 3 else "permanent",
                exception_type="TransientError" if i % 3 else "PermanentError",
                exception_message=message,
            )
            dlq.add(entry, ledger)
            added.append(entry.id)
        # The page's order is the index's: newest first, ties in time (same microsecond)
        # by id, as Redis sorts equal scores.
        ours = set(added)
        newest_first = [e.id for e in dlq.iter() if e.id in ours]
        assert sorted(newest_first) == sorted(added)
        with OpsProcess(env) as ops:
            page, problems = open_page(browser, f"{ops.url}/?refresh=30")
            started = time.perf_counter()
            use_token(page, TOKEN)
            rows = page.locator("#dlq-entries tbody tr")
            expect(rows.first).to_have_attribute("data-entry-id", newest_first[0], timeout=WAIT_MS)
            first_ms = (time.perf_counter() - started) * 1000
            expect(rows).to_have_count(50)
            expect(page.locator("#page-info")).to_have_text("entries 1 to 50 of 3003")
            expect(page.locator("#dlq-total")).to_have_text("3003 entries")
            counts = page.locator("#dlq-groups tbody tr td:nth-child(3)")
            expect(counts).to_have_text(["2000", "1000", "3"])

            # "Retry all" on a group redrives its entries (after the confirmation) and
            # only them: published to the queue (no worker here), gone from the DLQ.
            timeouts = fingerprint("TimeoutError", "export storage timed out")
            page.once("dialog", lambda dialog: dialog.accept())
            page.locator(f'#dlq-groups tr[data-fingerprint="{timeouts}"]').get_by_role(
                "button", name="Retry all"
            ).click()
            expect(page.locator("#notice")).to_have_text(
                f"fingerprint {timeouts}: 3 redriven, 0 refused", timeout=WAIT_MS
            )
            expect(counts).to_have_text(["2000", "1000"])
            expect(page.locator("#dlq-total")).to_have_text("3000 entries")
            expect(page.locator("#page-info")).to_have_text("entries 1 to 50 of 3000")

            # The 60th (last) page: 59 clicks on "older" would do; a later offset is the
            # same request, so the test jumps by the group's Show button and one "older".
            started = time.perf_counter()
            page.click("#page-next")
            expect(rows.first).to_have_attribute("data-entry-id", newest_first[50])
            next_ms = (time.perf_counter() - started) * 1000
            expect(page.locator("#page-info")).to_have_text("entries 51 to 100 of 3000")

            permanent = fingerprint("PermanentError", "answered 400")
            group = page.locator(f'#dlq-groups tr[data-fingerprint="{permanent}"]')
            started = time.perf_counter()
            group.get_by_role("button", name="Show").click()
            expect(page.locator("#page-info")).to_have_text(
                f"entries 1 to 50 of 1000 with fingerprint {permanent}"
            )
            permanents = {i for n, i in enumerate(added) if n % 3 == 0}
            wanted = [i for i in newest_first if i in permanents]
            expect(rows.first).to_have_attribute("data-entry-id", wanted[0])
            filter_ms = (time.perf_counter() - started) * 1000
            page.click("#page-next")
            expect(rows.first).to_have_attribute("data-entry-id", wanted[50])
            # Another filter (a class) has no known count: "matching the filter".
            page.select_option("#f-class", "permanent")
            page.fill("#f-fingerprint", "")
            page.click("#dlq-filter button[type=submit]")
            expect(page.locator("#page-info")).to_have_text("entries 1 to 50 matching the filter")
            expect(rows.first).to_have_attribute("data-entry-id", wanted[0])
            print(
                f"\n3000 entries in the page: first page {first_ms:.0f} ms, next page"
                f" {next_ms:.0f} ms, a fingerprint's entries {filter_ms:.0f} ms"
            )
            screenshot(page, artifacts, "dashboard-3000-entries.png")
            assert problems == []
            page.close()
    finally:
        delete_prefix(redis_url, env.prefix)
