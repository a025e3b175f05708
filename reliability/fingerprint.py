"""Error fingerprints: one name for every failure of the same kind.

``ConnectionError: timeout after 30.2s talking to 10.0.0.7:443 (req 8f3a...)`` and the
same error a second later with other numbers are one problem to an operator. A
fingerprint is the exception type plus its message with the variable parts replaced
(numbers, hex and UUID ids, quoted values, e-mail addresses, URLs' query strings), then
hashed short — linear in the message's length, and the message is cut first. The DLQ
groups entries by it and the reliability report lists the top ones.
"""

from __future__ import annotations

import hashlib
import re

# Longest part of a message that is normalised (the rest cannot change the kind).
MAX_CHARS = 500

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}"), "<email>"),
    (re.compile(r"\?[^\s'\"]{0,500}"), "?<query>"),
    (
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        "<uuid>",
    ),
    (re.compile(r"\b(?=[0-9a-fA-F]{0,64}[0-9])[0-9a-fA-F]{8,64}\b"), "<hex>"),
    (re.compile(r"'[^'\n]{0,200}'|\"[^\"\n]{0,200}\""), "<str>"),
    (re.compile(r"\d+(?:[.,:]\d+)*"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def normalise(message: str) -> str:
    """The message with its variable parts replaced (see the module docstring)."""
    text = message[:MAX_CHARS]
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


def fingerprint(exception_type: str | None, message: str | None) -> str:
    """A short stable id of the failure's kind: 12 hex characters."""
    kind = f"{exception_type or 'unknown'}: {normalise(message or '')}"
    return hashlib.sha256(kind.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def label(exception_type: str | None, message: str | None) -> str:
    """The normalised text a fingerprint stands for, for people (cut to 200 characters)."""
    return f"{exception_type or 'unknown'}: {normalise(message or '')}"[:200]
