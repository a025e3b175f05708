"""Error fingerprints group failures of one kind (reliability/fingerprint.py)."""

from __future__ import annotations

from reliability.fingerprint import fingerprint, label, normalise


def test_variable_parts_are_replaced() -> None:
    assert normalise("timeout after 30.2s talking to 10.0.0.7:443") == (
        "timeout after <n>s talking to <n>"
    )
    assert normalise("order 8f3a9c2e1b7d not found for 'pay_123'") == (
        "order <hex> not found for <str>"
    )
    assert normalise("user 5b0e5f0c-8a7e-4c2d-9f0a-1b2c3d4e5f60 at a@b.example.com") == (
        "user <uuid> at <email>"
    )
    assert normalise("GET https://api.example.com/v1/charges?id=7&key=k  failed") == (
        "GET https://api.example.com/v<n>/charges?<query> failed"
    )


def test_same_kind_same_fingerprint_other_kind_other() -> None:
    a = fingerprint("ConnectionError", "timeout after 30.2s (req 8f3a9c2e1b7d)")
    b = fingerprint("ConnectionError", "timeout after 12s (req 00aa11bb22cc)")
    c = fingerprint("TimeoutError", "timeout after 12s (req 00aa11bb22cc)")
    d = fingerprint("ConnectionError", "refused")
    assert a == b and len(a) == 12
    assert len({a, c, d}) == 3
    assert fingerprint(None, None) == fingerprint(None, "")
    assert label("ValueError", "bad amount 42") == "ValueError: bad amount <n>"


def test_only_the_first_part_of_a_huge_message_counts() -> None:
    # Linear and bounded: the message is cut before any pattern runs.
    assert fingerprint("E", "x" * 600 + "9" * 5_000_000) == fingerprint("E", "x" * 600)
