"""Secrets in arguments: what is masked, what is not, in linear time; key names hold none.

Pure logic except where a key name or the DLQ is checked against a real Redis. The
fleet test (real worker, Flower) is ``tests/test_secrets_fleet.py``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from celery import Celery

from reliability import ReliableTask
from reliability.dlq import DeadLetter, DeadLetterQueue
from reliability.errors import ConfigurationError, IdempotencyConflict, RedriveRefused
from reliability.idempotency import derive_key, fingerprint
from reliability.idempotency_store import IdempotencyStore
from reliability.logs import configure_logging
from reliability.patterns import (
    SENSITIVE_KEY,
    luhn_valid,
    mask_patterns,
    may_hold_sensitive_word,
    sensitive_key,
)
from reliability.ratelimit import RateLimit, RateLimiter, admission_args, limit_keys
from reliability.reprs import ReliableAMQP, masked_reprs
from reliability.security import MASK, Masker, key_token
from reliability.sensitive import (
    SensitiveArgs,
    changed_arguments,
    clear_delivery_values,
    set_delivery_values,
)
from reliability.store import Keys, Store

# -- patterns ----------------------------------------------------------------------------


def test_url_passwords_are_masked_and_urls_without_one_are_kept() -> None:
    assert mask_patterns("https://user:s3cretpw@hooks.example.com/in") == (
        "https://user:***@hooks.example.com/in"
    )
    assert mask_patterns("redis://:r3dis@db:6379/0") == "redis://:***@db:6379/0"
    # A password with an unescaped '@' is masked up to the authority's last '@'.
    assert mask_patterns("https://me@corp.com:p@ss@host/x") == "https://me@corp.com:***@host/x"
    assert mask_patterns('{"url": "https://u:pw@h/x"}') == '{"url": "https://u:***@h/x"}'
    for kept in (
        "http://example.com:8080/path",
        "https://user@example.com/x",
        "see https://example.com/a?b=c:d@e",
        "mailto:someone@example.com",
    ):
        assert mask_patterns(kept) == kept


def test_sensitive_query_parameters_are_masked_and_the_others_kept() -> None:
    assert mask_patterns("https://h/cb?page=2&api_key=abc123&Token=x9&sort=asc") == (
        "https://h/cb?page=2&api_key=***&Token=***&sort=asc"
    )
    assert mask_patterns("POST /login?user=bob&password=hunter2 HTTP/1.1") == (
        "POST /login?user=bob&password=*** HTTP/1.1"
    )
    assert mask_patterns("https://h/?amount=1999&currency=EUR") == (
        "https://h/?amount=1999&currency=EUR"
    )


def test_bearer_tokens_are_masked_but_prose_about_them_is_kept() -> None:
    assert mask_patterns("Authorization: Bearer eyJhbGciOi.J9.abc-_~+/=") == (
        "Authorization: Bearer ***"
    )
    assert mask_patterns("bearer  abcdefgh12345678") == "bearer  ***"
    assert mask_patterns("AUTHORIZATION: BEARER abcdefgh12345678") == "AUTHORIZATION: BEARER ***"
    for kept in ("missing Bearer token", "Bearer tokens expire", "the Wayfarer abcdefghijkl"):
        assert mask_patterns(kept) == kept


def test_prefixed_api_keys_keep_their_prefix_and_lose_the_rest() -> None:
    text = (
        "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc, test sk_test_abcdefgh12, restricted "
        "rk_live_ABCDEFGH1234, hook whsec_abcdefghijklmnop1234, gh ghp_"
        + "a" * 36
        + ", slack xoxb-1234567890-abcdef"
    )
    assert mask_patterns(text) == (
        "stripe sk_live_***, test sk_test_***, restricted rk_live_***, hook whsec_***, "
        "gh ghp_***, slack xoxb-***"
    )
    for kept in (
        "disk_test_abcdefghij",
        "sk_live_short",
        "pk_live_abcdefgh1234",
        "the task_test_retrieslogged",
    ):
        assert mask_patterns(kept) == kept


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555555555554444",
        "2223003122003222",
        "378282246310005",
        "3782 822463 10005",
        "6011111111111117",
        "4222222222222",
    ],
)
def test_card_numbers_are_masked(card: str) -> None:
    assert luhn_valid(card.replace(" ", "").replace("-", ""))
    assert mask_patterns(f"card {card} ok") == "card *** ok"


def test_a_card_among_other_digit_groups_is_found() -> None:
    assert mask_patterns("card 4111 1111 1111 1111 12/25") == "card *** 12/25"
    assert mask_patterns("ref 12 34 4111-1111-1111-1111 99") == "ref 12 34 *** 99"
    assert mask_patterns("4111111111111111 5555555555554444") == "*** ***"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("login failed password=hunter2 user=bob", "login failed password=*** user=bob"),
        ("DB_PASSWORD = hunter2;next", "DB_PASSWORD = ***;next"),
        ("x-api-key: abc123, retry", "x-api-key: ***, retry"),
        (
            "APIKEY=k1 SECRET=s1 Credential=c1 private_key=p1 CVC: 123",
            "APIKEY=*** SECRET=*** Credential=*** private_key=*** CVC: ***",
        ),
        ('password="two words" next', 'password="***" next'),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("Authorization: Bearer eyJhbGciOi.J9.abc", "Authorization: Bearer ***"),
        # Celery's dumps of a body and of headers (reprs) and JSON.
        ("{'password': 'PW secret', 'amount': 5}", "{'password': '***', 'amount': 5}"),
        (
            '{"api_key": "k 1", "token_count": 5, "token": null}',
            '{"api_key": "***", "token_count": 5, "token": null}',
        ),
        ("password=token=abc next", "password=*** next"),
        ("password=***", "password=***"),
    ],
)
def test_sensitive_key_value_pairs_in_free_text_are_masked(text: str, masked: str) -> None:
    assert mask_patterns(text) == masked


def test_key_value_masking_keeps_rendered_json_valid_and_other_pairs_readable() -> None:
    body = json.dumps({"password": "abc xyz", "user": "bob"})
    line = json.dumps({"event": f"body: {body} token=T1", "token_count": 3, "level": "info"})
    masked = mask_patterns(line)
    assert json.loads(masked) == {
        "event": 'body: {"password": "***", "user": "bob"} token=***',
        "token_count": 3,
        "level": "info",
    }
    for kept in (
        "amount=1999 currency=EUR",
        "https://h/x:8080",
        "token:",
        "'secret': ''",
        "Bearer tokens expire",
    ):
        assert mask_patterns(kept) == kept


def test_the_sensitive_word_check_folds_every_character_re_equates_with_a_letter() -> None:
    """The pair masker skips a text in which no key word can be (``key`` stands for
    api_key and private_key). Case-insensitive matching equates a few non-ASCII
    characters with ASCII letters that ``str.lower`` keeps apart (dotless i, long s,
    Kelvin sign): over every code point, a word spelt with any of them is still found."""
    words = ("pass", "secret", "token", "key", "authorization", "credential", "cvv", "cvc")
    letters = sorted(set("".join(words)))
    either = re.compile("(?i)[" + "".join(letters) + "]")
    spellings = 0
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if char.isascii() or not either.fullmatch(char):
            continue
        for letter in (x for x in letters if re.fullmatch("(?i)" + x, char)):
            for word in (w for w in words if letter in w):
                assert may_hold_sensitive_word(word.replace(letter, char)), (char, word)
                spellings += 1
    assert spellings >= 3


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("pa\u017fs=hunter2 next", "pa\u017fs=*** next"),
        ("author\u0131zation: abc", "author\u0131zation: ***"),
        ("AUTHOR\u0130ZATION: abc", "AUTHOR\u0130ZATION: ***"),
        ("to\u212aen=abc", "to\u212aen=***"),
        ("PaSs: abc", "PaSs: ***"),
    ],
)
def test_keys_spelt_with_characters_re_equates_with_ascii_letters_are_still_masked(
    text: str, masked: str
) -> None:
    assert mask_patterns(text) == masked


def test_texts_without_a_sensitive_word_skip_the_pair_scan_unchanged() -> None:
    line = json.dumps({"event": "Task x[4b7c] succeeded in 0.01s: None", "at": "02:20:00"})
    assert not may_hold_sensitive_word(line)
    assert mask_patterns(line) == line
    assert may_hold_sensitive_word('{"idempotency_key": 1}')


def test_the_cached_sensitive_key_verdict_is_the_regex_s() -> None:
    for name in (
        "password",
        "task_id",
        "x-API-key",
        "pa\u017fs",
        "a" * 200 + "token",
        "",
        "kwargs",
    ):
        for _ in range(2):  # the second call is a cache hit (or, past 64 characters, none)
            assert sensitive_key(name) == (SENSITIVE_KEY.search(name) is not None)


@pytest.mark.parametrize(
    "kept",
    [
        "order 4111111111111112",  # fails Luhn: an order id, not a card
        "order 1234 5678 9012 3456",  # fails Luhn
        "at 1714567890123456 us",  # an epoch timestamp (starts with 1)
        "pi 3.4111111111111111",  # the decimals of a number
        "id 41111111111111111111111",  # too long to be a card
        "phone +44 20 7946 0958",
        "2024-05-01T10:00:00Z",
        "amount=1999",
    ],
)
def test_numbers_that_are_not_cards_are_kept(kept: str) -> None:
    assert mask_patterns(kept) == kept


# A 2 MB worst case for each pattern family. The old URL regex backtracked over every
# run of letters: 80 k characters took 25.8 s, so 2 MB would take hours. Each of these
# completes inside the pytest timeout; the seconds are printed by bench/masking.py.
ADVERSARIAL_2MB: dict[str, str] = {
    "letters (the old quadratic case)": "a" * 2_000_000,
    "schemes without credentials": "https://" * 250_000,
    "userinfo without '@'": ("://a:" + "b" * 4000) * 500,
    "digits": "4" * 2_000_000,
    "four-digit groups": "4111 " * 400_000,
    "two-digit groups": "12 " * 666_667,
    "query parameters": "&tokentokentokentokentokentoken" * 64_000,
    "bearer words": "Bearer x " * 222_223,
    "key prefixes": "sk_live_" * 250_000,
    "key characters before '='": ("a" * 32 + "=") * 60_607,
    "sensitive pairs": "token=xxx " * 200_000,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(ADVERSARIAL_2MB))
def test_masking_a_2mb_worst_case_completes(name: str) -> None:
    text = ADVERSARIAL_2MB[name]
    masked = Masker(["configured-secret-value"]).text(text)
    assert len(masked) <= len(text)


# -- the masker --------------------------------------------------------------------------


def test_a_delivery_s_sensitive_values_are_masked_by_value_until_cleared() -> None:
    masker = Masker()
    set_delivery_values(["otp-842913-xyz", "abc", 'quo"te-value'])
    try:
        assert masker.text("sent otp-842913-xyz to abc") == "sent *** to abc"  # "abc": too short
        assert masker.text('{"m": "quo\\"te-value"}') == '{"m": "***"}'  # as JSON renders it
    finally:
        clear_delivery_values()
    assert masker.text("sent otp-842913-xyz") == "sent otp-842913-xyz"


def test_including_masks_extra_values_and_leaves_the_original_alone() -> None:
    masker = Masker(["configured-1234"])
    wider = masker.including(["delivery-5678"])
    assert wider.text("configured-1234 delivery-5678") == "*** ***"
    assert masker.text("configured-1234 delivery-5678") == "*** delivery-5678"
    assert masker.including([]) is masker


def _webhook(url: str, event_id: str, *extra: Any, api_key: str = "", **more: Any) -> None:
    """A signature for SensitiveArgs."""


def test_sensitive_args_mask_positional_keyword_and_star_arguments() -> None:
    signature = inspect.signature(_webhook)
    sensitive = SensitiveArgs.of(("url", "extra", "api_key"), signature)
    args, kwargs = sensitive.redact(["https://u:p@h", "e1", "x", "y"], {"api_key": "k", "n": 1})
    assert (args, kwargs) == ([MASK, "e1", MASK, MASK], {"api_key": MASK, "n": 1})
    by_keyword = sensitive.redact([], {"url": "https://h", "event_id": "e1"})
    assert by_keyword == ([], {"url": MASK, "event_id": "e1"})
    every_extra = SensitiveArgs.of(("more",), signature)
    assert every_extra.redact([], {"url": "u", "token": "t"}) == ([], {"url": "u", "token": MASK})
    assert not SensitiveArgs.of((), signature)


def test_sensitive_values_are_the_text_the_arguments_hold_longest_first() -> None:
    sensitive = SensitiveArgs.of(("url", "api_key"), inspect.signature(_webhook))
    found = sensitive.values(
        ["https://u:pw@h/x", "evt-1"],
        {"api_key": {"primary": "key-12345", "pin": 4321, "on": True}},
    )
    assert found == ["https://u:pw@h/x", "key-12345", "4321"]


def test_a_call_is_masked_whole_for_sensitive_args_and_by_value_key_and_pattern_elsewhere() -> None:
    masker = Masker(["configured-secret"])
    sensitive = SensitiveArgs.of(("url",), inspect.signature(_webhook))
    raw_args = ["https://u:pw@h/x", "evt-1"]
    raw_kwargs = {
        "payload": {
            "api_key": "ak-1",
            "card": "4111 1111 1111 1111",
            "note": "uses configured-secret",
            "items": [1, 2],
        }
    }
    args, kwargs = masker.call(raw_args, raw_kwargs, sensitive)
    assert args == [MASK, "evt-1"]
    assert kwargs == {
        "payload": {"api_key": MASK, "card": MASK, "note": "uses ***", "items": [1, 2]}
    }
    assert changed_arguments(["url", "event_id"], raw_args, raw_kwargs, args, kwargs) == [
        "url",
        "payload",
    ]
    assert changed_arguments(["url"], ["a", "b"], {}, ["a", "b"], {}) == []


def test_deeply_nested_data_is_masked_without_recursion() -> None:
    node: Any = {"password": "pw"}
    for _ in range(5000):
        node = {"child": [node]}
    masked = Masker().data(node)
    for _ in range(5000):
        masked = masked["child"][0]
    assert masked == {"password": MASK}


def test_log_lines_mask_sensitive_keys_at_any_depth(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO", True, Masker())
    set_delivery_values(["delivery-value-77"])
    try:
        structlog.get_logger("t").info(
            "sent",
            payload={"api_key": "ak-live-1", "n": 2},
            items=[{"token": "tk-2"}],
            note="delivery-value-77",
            tokens=3,
        )
        line = capsys.readouterr().err
    finally:
        clear_delivery_values()
        root.handlers, level = saved
        root.setLevel(level)
        structlog.reset_defaults()
    assert "ak-live-1" not in line and "tk-2" not in line and "delivery-value-77" not in line
    assert '"tokens": 3' in line and '"n": 2' in line


# -- what Celery shows of the arguments ---------------------------------------------------


@pytest.fixture
def app() -> Celery:
    celery = Celery("t", set_as_current=False, amqp="reliability.reprs:ReliableAMQP")
    celery.finalize()
    return celery


def declare(app: Celery, **options: Any) -> Callable[..., Any]:
    def deliver(url: str, event_id: str, payload: dict[str, Any]) -> None:
        return None

    return app.task(base=ReliableTask, name="t.deliver", shared=False, **options)(deliver)


def test_masked_reprs_hide_sensitive_arguments_and_cut_long_ones(app: Celery) -> None:
    task = declare(app, sensitive_args=("url",))
    args_repr, kwargs_repr = masked_reprs(
        task, ("https://u:pw@h", "evt-1"), {"payload": {"api_key": "ak-1", "blob": "x" * 10**6}}
    )
    assert args_repr == "('***', 'evt-1')"
    assert "'api_key': '***'" in kwargs_repr and "ak-1" not in kwargs_repr
    assert len(kwargs_repr) < 1100


def test_an_argument_repr_is_bounded_whatever_the_shape_of_the_arguments() -> None:
    deep: Any = "leaf"
    for _ in range(5000):
        deep = [deep]
    shapes = {
        "many items": list(range(1_000_000)),
        "wide dict": {f"k{i}": i for i in range(100_000)},
        "deep": deep,
        "long string": "y" * 10_000_000,
    }
    for name, value in shapes.items():
        args_repr, kwargs_repr = masked_reprs(None, [value], {"v": value})
        assert len(args_repr) <= 1027 and len(kwargs_repr) <= 1027, name


def test_a_secret_split_by_the_repr_cut_shows_no_part_of_itself() -> None:
    card = "4111 1111 1111 1111"
    for offset in range(990, 1300, 3):  # around the repr cut and the string cut
        args_repr, _ = masked_reprs(None, ["x" * offset + card], {})
        assert "4111" not in args_repr and "1111 1111" not in args_repr, offset


def test_messages_the_app_publishes_carry_masked_reprs_in_headers_and_sent_events(
    app: Celery,
) -> None:
    assert isinstance(app.amqp, ReliableAMQP)
    declare(app, sensitive_args=("url",))
    message = app.amqp.create_task_message(
        "id-1",
        "t.deliver",
        ["https://u:s3cretpw@h/x", "evt-1"],
        {"payload": {"api_key": "ak-secret-1"}},
        create_sent_event=True,
    )
    for shown in (message.headers, message.sent_event):
        text = (
            f"{shown['argsrepr' if shown is message.headers else 'args']}"
            f"{shown['kwargsrepr' if shown is message.headers else 'kwargs']}"
        )
        assert "s3cretpw" not in text and "ak-secret-1" not in text
        assert "'***'" in text
    # The body keeps the real arguments: the task needs them.
    assert message.body[0] == ["https://u:s3cretpw@h/x", "evt-1"]
    explicit = app.amqp.create_task_message(
        "id-2", "t.deliver", [], {}, argsrepr="token sk_live_abcdefgh1234", kwargsrepr="{}"
    )
    assert explicit.headers["argsrepr"] == "token sk_live_***"


def test_sensitive_args_must_name_parameters(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match=r"sensitive_args \['api_kye'\] are not param"):
        declare(app, sensitive_args=("url", "api_kye"))
    for wrong in ("url", 3, ("url", 3)):
        with pytest.raises(ConfigurationError, match="sensitive_args must be a sequence"):
            declare(app, sensitive_args=wrong)
    with pytest.raises(ConfigurationError, match="unknown option 'sensitive_arg'"):
        declare(app, sensitive_arg=("url",))
    assert declare(app, sensitive_args=("url", "payload")).sensitive.names == {"url", "payload"}


# -- Redis key names hold no argument values ------------------------------------------


def test_key_tokens_keep_short_safe_values_and_hash_the_rest() -> None:
    assert key_token("order-42_a.b") == "order-42_a.b"
    assert key_token("4111111111111112") == "4111111111111112"  # fails Luhn: not a card
    # Safe characters, but what the masker would hide: a card, a prefixed API key.
    for unsafe in (
        "https://u:pw@h",
        "a" * 65,
        "x:y",
        "*",
        "a b",
        "",
        "4012888888881881",
        "4012-8888-8888-1881",
        "sk_live_abcdefgh1234",
        "ghp_" + "a" * 36,
    ):
        token = key_token(unsafe)
        assert token == "sha256=" + hashlib.sha256(unsafe.encode()).hexdigest()


def test_derived_keys_hash_argument_values_and_stay_deterministic() -> None:
    secret_url = "https://u:s3cretpw@h/x"
    arguments = {"url": secret_url, "event_id": "evt-1", "payload": {"a": 1}}
    key = derive_key("webhooks.deliver", arguments, key_args=("url", "event_id"))
    assert key.startswith("webhooks.deliver:args:") and "s3cretpw" not in key
    assert "evt-1" not in key
    assert key == derive_key(
        "webhooks.deliver", {**arguments, "payload": {"b": 2}}, key_args=("url", "event_id")
    )
    assert key != derive_key(
        "webhooks.deliver", {**arguments, "event_id": "evt-2"}, key_args=("url", "event_id")
    )
    assert key != derive_key("other.task", arguments, key_args=("url", "event_id"))
    assert derive_key("t", arguments, header="order-42") == "t:order-42"
    long_header = derive_key("t", arguments, header=secret_url)
    assert "s3cretpw" not in long_header and long_header == derive_key("t", {}, header=secret_url)


def test_same_hashed_key_with_different_arguments_is_still_a_conflict(bare_store: Store) -> None:
    ids = IdempotencyStore(bare_store)
    first = {"payment_id": "4111 1111 1111 1111", "amount": 100}
    second = {**first, "amount": 200}
    redis_key = ids.redis_key(derive_key("t.charge", first, key_args=("payment_id",)))
    assert redis_key == ids.redis_key(derive_key("t.charge", second, key_args=("payment_id",)))
    executed, _ = ids.run_once(redis_key, fingerprint(first), lambda _lease: "charged")
    assert executed
    with pytest.raises(IdempotencyConflict):
        ids.run_once(redis_key, fingerprint(second), lambda _lease: "charged again")
    assert "4111" not in redis_key


def test_rate_limit_scopes_from_input_are_hashed_and_reset_finds_them(bare_store: Store) -> None:
    per_user = RateLimit(name="per-user", kind="gcra", rate=0.001, burst=2, per="user")
    keys, _ = admission_args(
        bare_store, "t", [per_user], "owner", None, lambda: {"user_id": "alice@example.com"}
    )
    assert "alice" not in keys[0]
    # The CLI (`reliable limits reset per-user --scope alice@example.com`) takes the value.
    limiter = RateLimiter(bare_store, per_user, scope="alice@example.com")
    assert limiter.keys[0] == keys[0]
    assert limiter.try_acquire() and limiter.try_acquire() and not limiter.try_acquire()
    limiter.reset()
    assert limiter.try_acquire()
    per_tenant = RateLimit(name="per-tenant", per="tenant")
    assert limit_keys(bare_store, per_tenant, "acme")[0].endswith(":rl:acme")
    assert "@" not in limit_keys(bare_store, per_tenant, "Acme Corp <ops@acme>")[0]
    cfg_scope, cfg = limit_keys(bare_store, per_tenant, "cfg")
    assert cfg_scope != cfg
    global_limit = RateLimit(name="g")
    assert limit_keys(bare_store, global_limit, "-")[0].endswith(":rl:-")


def test_ids_from_headers_are_hashed_in_key_names_unless_short_and_safe() -> None:
    keys = Keys("p")
    uuid_id = "5f0c7b1e-6a1d-4bde-9a55-0f6a4cbd1c2e"
    assert keys.delivery("tag", uuid_id, 0, "0") == f"p:{{tag}}:dlv:{uuid_id}:0:0"
    assert "s3cret" not in keys.delivery("tag", "id with s3cret", 1, "0")
    assert "s3cret" not in keys.defer("tag", "s3cret:*")


def test_an_entry_with_masked_arguments_is_not_redriven(bare_store: Store) -> None:
    dlq = DeadLetterQueue(bare_store)
    entry = DeadLetter(
        task_name="notifications.send",
        task_id="t-1",
        failure_class="transient",
        kwargs={"user_id": "u1", "message": MASK},
        masked_args=["message"],
    )

    class NoLedger:
        max_len = 100

    dlq.add(entry, NoLedger())
    published: list[str] = []

    class Recorder:
        def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            published.append(name)

    with pytest.raises(RedriveRefused, match="keeps message masked"):
        dlq.redrive(entry.id, Recorder())
    assert published == [] and dlq.get(entry.id) is not None
