"""Secrets text masking finds without being told, each in time linear in the text.

:func:`mask_patterns` replaces, in one string:

* URL passwords: ``scheme://user:password@host`` -> ``scheme://user:***@host``;
* sensitive query parameters: ``?api_key=...``, ``&token=...`` (names as
  :data:`SENSITIVE_KEY`) -> ``?api_key=***``;
* ``key=value`` and ``key: value`` pairs in free text whose key is sensitive (as
  :data:`SENSITIVE_KEY`: ``password=hunter2``, ``DB_PASSWORD = x``, ``api-key: x``,
  ``Authorization: Basic x``) -> ``password=***``; a quoted key with a quoted value
  (``'password': 'x'``, ``"token": "x"``, in reprs and JSON) -> ``'password': '***'``.
  A quoted key with an unquoted value (a JSON number, ``null``) is left alone, so a
  rendered JSON log line stays valid JSON;
* bearer tokens: ``Bearer <token>`` -> ``Bearer ***``;
* API keys recognisable by their prefix: ``sk_live_``/``sk_test_``/``rk_live_``/``rk_test_``
  (Stripe), ``whsec_``, GitHub ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``/``github_pat_``,
  Slack ``xoxb-``/``xoxp-``/... -> the prefix followed by ``***``;
* payment card numbers: 13-19 digits, contiguous or in groups separated by one space or
  dash, starting with 2-6 (the card networks' prefixes) and passing the Luhn check -> ``***``.
  Order ids, timestamps and phone numbers stay readable (90% of random 16-digit numbers
  fail Luhn, and epoch times start with 1).

Why linear: the masker runs on every log line, DLQ entry and result, and on arguments
of any size (a 5 MB argument once kept a worker busy for minutes with a backtracking
URL regex). Every pattern starts with a literal (found by a fast substring search) or
a single character class, and every repetition is either bounded or possessive, so no
position of the text is examined more than a bounded number of times. Patterns whose
literal is absent are skipped after one ``in`` check.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

MASK = "***"
# Keys whose values are masked whatever they contain (dict keys, log fields, query names).
SENSITIVE_KEY = re.compile(
    r"pass(?:word|wd)?|secret|token|api[_-]?key|authorization|credential|private[_-]?key"
    r"|cvv|cvc",
    re.I,
)
# Names up to this long have their verdict cached: a log line, a result's meta and a
# task's arguments judge the same few field names each time (the search costs about a
# microsecond a name, a cache hit a tenth of that). Longer names are searched each time,
# so the cache stays small whatever the input.
_CACHED_NAME_CHARS = 64


@functools.lru_cache(maxsize=4096)
def _sensitive_name(name: str) -> bool:
    return SENSITIVE_KEY.search(name) is not None


def sensitive_key(name: str) -> bool:
    """True when values under ``name`` are masked whole (``name`` matches
    :data:`SENSITIVE_KEY`): a pure function of the name, cached for short names."""
    if type(name) is str and len(name) <= _CACHED_NAME_CHARS:
        return _sensitive_name(name)
    return SENSITIVE_KEY.search(name) is not None


# ://user:password@ — the scheme is not part of the match (the literal "://" leads, so
# the regex engine finds candidates with a substring search). The user part stops at
# ':' (no '@' needed), the password runs to the last '@' of the authority; both are
# bounded, so one candidate costs at most ~4 k steps and candidates cannot share
# characters (each authority ends at the next '/').
_URL = re.compile(r"://([^\s/?#:\"'<>]{0,256}):([^\s/?#\"'<>]{1,4096})@")
# ?name=value / &name=value where the name contains a sensitive word (as SENSITIVE_KEY;
# in the regex itself, so ordinary parameters cost no Python call). Name parts bounded.
_QUERY = re.compile(
    r"([?&])([A-Za-z0-9_.\-]{0,32}?(?i:pass|secret|token|api[_-]?key|authorization|credential"
    r"|private[_-]?key|cvv|cvc)[A-Za-z0-9_.\-]{0,32})=[^&\s\"'<>#]++"
)
# key=value / key: value where the key holds a sensitive word (SENSITIVE_KEY's words; a
# key containing the word is sensitive, as for dict keys). Found from the separator, which
# leads: the key is read backwards by matching the *reversed* text (a separator, an
# optional quote, then at most 32 key characters before the reversed word — bounded), so
# the scan is a C-speed search for ':' or '='; each hit's value is then read forwards.
# The reversed words start with one character class, each alternative then checked by a
# lookbehind on that character (no alternation tried at non-candidate characters). A
# separator followed by '/' (``https://``) is a URL's, not a pair's.
_REVERSED_WORDS = (
    r"[stnylvcSTNYLVC](?:(?<=[sS])(?i:sap)|(?<=[tT])(?i:erces)|(?<=[nN])(?i:ekot|oitazirohtua)"
    r"|(?<=[yY])(?i:ek[_-]?ipa|ek[_-]?etavirp)|(?<=[lL])(?i:aitnederc)|(?<=[vV])(?i:vc)"
    r"|(?<=[cC])(?i:vc))"
)
_SENSITIVE_KEY_BEFORE = re.compile(
    r"[:=](?<!/[:=])[ \t]{0,4}+(?P<quote>[\"']\\?)?[A-Za-z0-9_\-]{0,32}?" + _REVERSED_WORDS
)
# The value after a quoted key (repr/JSON): a quoted value only, up to its closing quote
# (a number or null after a quoted key is left alone, so rendered JSON stays valid).
_QUOTED_VALUE = r"(?:[^\\\"'\n]|\\[^\"'\n]){1,4096}+"
_VALUE_AFTER_QUOTED_KEY = re.compile(r"[ \t]{0,4}+\\?[\"'](" + _QUOTED_VALUE + ")")
# The value after a bare key: quoted, or a run of non-space, non-delimiter characters;
# an auth scheme (``Authorization: Basic x``) is kept.
_VALUE_AFTER_BARE_KEY = re.compile(
    r"[ \t]{0,4}+(?:(?i:bearer|basic|token|digest)[ \t]{1,4}+)?"
    r"(?:\\?[\"'](" + _QUOTED_VALUE + r")|([^\s\"'\\,;&<>]{1,4096}+))"
)


# A pair's key holds one of these words (:data:`_REVERSED_WORDS`, read forwards; "key"
# for api_key and private_key). Characters that case-insensitive matching equates with
# one of their ASCII letters but ``str.lower`` does not map to it are folded first (the
# tests check this table against the ``re`` module over every code point).
_SENSITIVE_WORDS = ("pass", "secret", "token", "key", "authorization", "credential", "cvv", "cvc")
_FOLD_TO_ASCII = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})


def may_hold_sensitive_word(text: str) -> bool:
    """False only when no sensitive key can be in ``text``: a substring check on the
    lower-cased text, far cheaper than the reversed scan it spares (most log lines
    and values name no secret)."""
    folded = (text if text.isascii() else text.translate(_FOLD_TO_ASCII)).lower()
    return any(word in folded for word in _SENSITIVE_WORDS)


def _mask_key_values(text: str) -> str:
    """``text`` with the value of every sensitive ``key=value`` / ``key: value`` masked."""
    if ("=" not in text and ":" not in text) or not may_hold_sensitive_word(text):
        return text
    reverse = text[::-1]
    last = len(text) - 1
    spans: list[tuple[int, int]] = []
    covered = -1
    # Reversed matches come last-separator first: walk them in the text's order.
    for hit in reversed(list(_SENSITIVE_KEY_BEFORE.finditer(reverse))):
        separator = last - hit.start()
        if separator < covered:
            continue  # inside the value masked just before ("password=token=x")
        reader = _VALUE_AFTER_QUOTED_KEY if hit.group("quote") else _VALUE_AFTER_BARE_KEY
        value = reader.match(text, separator + 1)
        if value is None:
            continue
        group = 1 if value.group(1) is not None else 2
        start, end = value.span(group)
        spans.append((start, end))
        covered = end
    if not spans:
        return text
    out: list[str] = []
    position = 0
    for start, end in spans:
        out.append(text[position:start])
        out.append(MASK)
        position = end
    out.append(text[position:])
    return "".join(out)


# Bearer tokens: led by the literal "earer" (then checked for its B), at least 8
# token characters so prose ("Bearer tokens expire") stays readable.
_TOKEN_CHARS = r"[A-Za-z0-9\-._~+/]{8,}+=*+"
_BEARER = re.compile(r"earer(?<=[Bb]earer)(?<![A-Za-z0-9_][Bb]earer)([ \t]{1,8})" + _TOKEN_CHARS)
_BEARER_UPPER = re.compile(r"EARER(?<=BEARER)(?<![A-Za-z0-9_]BEARER)([ \t]{1,8})" + _TOKEN_CHARS)
# (literal that must be present, regex, replacement keeping the recognisable prefix)
_PREFIXED_KEYS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "k_",
        re.compile(
            r"(k_(?:live|test)_)(?<=[sr]k_live_|[sr]k_test_)"
            r"(?<![A-Za-z0-9][sr]k_live_)(?<![A-Za-z0-9][sr]k_test_)[A-Za-z0-9]{8,}+"
        ),
        r"\1" + MASK,
    ),
    ("whsec_", re.compile(r"(whsec_)(?<![A-Za-z0-9]whsec_)[A-Za-z0-9+/=]{16,}+"), r"\1" + MASK),
    ("gh", re.compile(r"(gh[pousr]_)(?<![A-Za-z0-9]gh[pousr]_)[A-Za-z0-9]{20,}+"), r"\1" + MASK),
    ("github_pat_", re.compile(r"(github_pat_)[A-Za-z0-9_]{20,}+"), r"\1" + MASK),
    (
        "xox",
        re.compile(r"(xox[abposr]-)(?<![A-Za-z0-9]xox[abposr]-)[A-Za-z0-9\-]{10,}+"),
        r"\1" + MASK,
    ),
)
# A run of digit groups separated by single spaces or dashes, at least 13 characters
# long (possessive: each run is consumed once). Not after a digit or '.', so the
# decimals of a number are not a run.
_DIGIT_RUN = re.compile(r"[0-9](?<![0-9.][0-9])(?=[0-9 \-]{12})[0-9]*+(?:[ -][0-9]++)*+")
# Where a card may start: a group of at least four digits beginning with 2-6.
_CARD_START = re.compile(r"(?<![0-9])[2-6][0-9]{3}")
_GROUPS = re.compile(r"([ -])")
_LUHN_DOUBLE = str.maketrans("0123456789", "0246813579")  # 2d, digits summed
CARD_MIN_DIGITS, CARD_MAX_DIGITS = 13, 19
_CARD_FIRST_DIGITS = frozenset("23456")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (every card number passes it)."""
    odd = sum(map(int, digits[-1::-2]))
    even = sum(map(int, digits[-2::-2].translate(_LUHN_DOUBLE)))
    return (odd + even) % 10 == 0


@functools.lru_cache(maxsize=4096)
def _luhn_parts(group: str) -> tuple[int, int]:
    """A group's share of a Luhn sum: (its first digit doubled, its first digit plain).

    Cached: a card's groups are short, so a run of groups costs a lookup per group.
    """
    evens, odds = group[0::2], group[1::2]
    first_doubled = sum(map(int, evens.translate(_LUHN_DOUBLE))) + sum(map(int, odds))
    first_plain = sum(map(int, evens)) + sum(map(int, odds.translate(_LUHN_DOUBLE)))
    return first_doubled, first_plain


def _card_end(groups: list[str], lengths: list[int], start: int) -> int:
    """The last group of the longest card number starting at ``groups[start]``, or -1.

    A card starts with a group of at least four digits (or is one contiguous group of
    13-19) and its further groups have at least three digits (4-4-4-4, 4-6-5, 4-4-4-4-3).
    The Luhn sum is kept for both parities while the window grows (digits at even
    offsets doubled, or odd ones), so each window costs one step, not a recount.
    """
    if lengths[start] < 4 or groups[start][0] not in _CARD_FIRST_DIGITS:
        return -1
    best, total, even, odd = -1, 0, 0, 0
    for end in range(start, len(groups)):
        length = lengths[end]
        if (end > start and length < 3) or total + length > CARD_MAX_DIGITS:
            break
        first_doubled, first_plain = _luhn_parts(groups[end])
        if total % 2 == 0:
            even, odd = even + first_doubled, odd + first_plain
        else:
            even, odd = even + first_plain, odd + first_doubled
        total += length
        # The rightmost digit is never doubled: with an even total, even offsets are.
        if total >= CARD_MIN_DIGITS and (even if total % 2 == 0 else odd) % 10 == 0:
            best = end
    return best


def _mask_card_run(match: re.Match[str]) -> str:
    run = match.group()
    if _CARD_START.search(run) is None:
        return run
    pieces = _GROUPS.split(run)  # digits, separator, digits, ...
    groups = pieces[0::2]
    lengths = list(map(len, groups))
    if len(groups) == 1:
        return MASK if _card_end(groups, lengths, 0) == 0 else run
    out: list[str] = []
    index, changed = 0, False
    while index < len(groups):
        end = _card_end(groups, lengths, index)
        if end < 0:
            out.append(groups[index])
            if index + 1 < len(groups):
                out.append(pieces[2 * index + 1])
            index += 1
            continue
        changed = True
        out.append(MASK)
        if end + 1 < len(groups):
            out.append(pieces[2 * end + 1])
        index = end + 1
    return "".join(out) if changed else run


_Step = tuple[str, Callable[[str], str]]


def _sub(
    pattern: re.Pattern[str], replacement: str | Callable[[re.Match[str]], str]
) -> Callable[[str], str]:
    return lambda text: pattern.sub(replacement, text)


# (literal that must occur for the step to run, the step); "" runs always.
_STEPS: tuple[_Step, ...] = (
    ("://", _sub(_URL, r"://\1:" + MASK + "@")),
    ("=", _sub(_QUERY, r"\1\2=" + MASK)),
    ("", _mask_key_values),
    ("earer", _sub(_BEARER, r"earer\1" + MASK)),
    ("EARER", _sub(_BEARER_UPPER, r"EARER\1" + MASK)),
    *((literal, _sub(pattern, replacement)) for literal, pattern, replacement in _PREFIXED_KEYS),
    ("", _sub(_DIGIT_RUN, _mask_card_run)),
)


def mask_patterns(text: str) -> str:
    """``text`` with every pattern above replaced; linear in ``len(text)``."""
    for literal, step in _STEPS:
        if not literal or literal in text:
            text = step(text)
    return text
