"""Masking time: a 10 MB argument, the worst cases, and the old regex for comparison.

    .venv/bin/python -m bench.masking            # ~1 min (includes the old regex on 80 k)
    .venv/bin/python -m bench.masking --quick    # the old regex on 40 k only

Prints seconds (best of ``--repeat`` runs) for ``Masker.text`` on 10 MB of text mixing
URLs (some with passwords and tokens), numbers (some card numbers), words and a
configured secret; then on 10 MB of each worst case found for the patterns (the one
that was quadratic: a long run of letters, which the old URL-credentials regex rescanned
from every position); then the DLQ and argsrepr paths on a 10 MB argument. Last, the old
URL regex against the new masker on the same 10-80 k inputs, and their ratio. No Redis
needed; nothing is asserted (tests check outcomes, this prints times).
"""

from __future__ import annotations

import argparse
import random
import re
import string
import time
from collections.abc import Callable

from reliability.reprs import masked_reprs
from reliability.security import Masker

MB = 1_000_000
CONFIGURED = "sk_live_configured_0123456789abcdef"
# The implementation this replaces (reliability/security.py before issue 6).
OLD_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@", re.I
)


def old_text(value: str) -> str:
    return OLD_URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", value)


def mixed_text(size: int, seed: int = 6) -> str:
    """Log-like text: words, ids, amounts, dates, URLs, a few secrets and card numbers."""
    rng = random.Random(seed)
    samples = [
        "https://api.example.com/v1/charges?page=2",
        "https://hooks.example.com/in/abc",
        "https://user:s3cretpw@hooks.example.com/in",
        "https://h/cb?api_key=ak_123456&x=1",
        "order 12345",
        "amount=1999",
        "2024-05-01T10:00:00Z",
        "+44 20 7946 0958",
        "4111 1111 1111 1111",
        "4111111111111112",
        "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x",
        CONFIGURED,
        "user@example.com",
        "retry in 3.5s",
    ]
    alphabet = string.ascii_letters + string.digits
    parts: list[str] = []
    total = 0
    while total < size:
        word = (
            rng.choice(samples)
            if rng.random() < 0.2
            else "".join(rng.choices(alphabet, k=rng.randint(1, 12)))
        )
        parts.append(word)
        total += len(word) + 1
    return " ".join(parts)[:size]


def four_digit_groups(size: int, seed: int = 3) -> str:
    """One run of random 4-digit groups starting with 2-6: every group may start a card,
    so every group costs a Luhn window (in Python): the slowest input known."""
    rng = random.Random(seed)
    count = size // 5 + 1
    return " ".join(str(rng.randint(2000, 6999)) for _ in range(count))[:size]


WORST_CASES: dict[str, Callable[[int], str]] = {
    "letters (was quadratic)": lambda n: "a" * n,
    "'https://' repeated": lambda n: ("https://" * (n // 8 + 1))[:n],
    "'://a:' + 4000 chars, no '@'": lambda n: (("://a:" + "b" * 4000) * (n // 4005 + 1))[:n],
    "digits": lambda n: "4" * n,
    "two-digit groups": lambda n: ("12 " * (n // 3 + 1))[:n],
    "four-digit groups (slowest)": lambda n: four_digit_groups(n),
    "'&token...' parameters": lambda n: (("&" + "token" * 6) * (n // 31 + 1))[:n],
    "'Bearer x' repeated": lambda n: ("Bearer x " * (n // 9 + 1))[:n],
    # key=value pairs, found from the separator: a separator after 32 key characters
    # with no sensitive word (each read back in full), or a pair to mask every 8
    # characters (the slowest: a Python step per pair).
    "32 key characters + '=' (no word)": lambda n: (("a" * 32 + "=") * (n // 33 + 1))[:n],
    "'token=x ' pairs (all masked)": lambda n: ("token=x " * (n // 8 + 1))[:n],
    '\'"secret": "\' + 4000 chars': lambda n: (('"secret": "' + "v" * 4000) * (n // 4011 + 1))[:n],
}


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="old regex on 10-40 k only (80 k takes ~25 s)"
    )
    args = parser.parse_args()
    size = int(args.size_mb * MB)
    masker = Masker([CONFIGURED, "hunter2-password"])

    print(f"Masker.text on {args.size_mb:g} MB (best of {args.repeat}):")
    text = mixed_text(size)
    print(
        f"  {'mixed text (URLs, digits, letters)':<36} "
        f"{best_of(args.repeat, lambda: masker.text(text)):7.3f} s"
    )
    for name, make in WORST_CASES.items():
        worst = make(size)
        print(f"  {name:<36} {best_of(args.repeat, lambda w=worst: masker.text(w)):7.3f} s")

    argument = mixed_text(size, seed=7)
    print(f"A {args.size_mb:g} MB argument on the other paths:")
    dlq = best_of(args.repeat, lambda: masker.call([argument, {"note": argument}], {}))
    print(f"  {'DLQ args (Masker.call)':<36} {dlq:7.3f} s")
    reprs = best_of(args.repeat, lambda: masked_reprs(None, [argument], {}, masker=masker))
    print(f"  {'argsrepr (cut, then masked)':<36} {reprs:7.3f} s")

    sizes = [10_000, 20_000, 40_000] + ([] if args.quick else [80_000])
    print("Old URL regex vs new Masker.text on a run of letters:")
    for n in sizes:
        letters = "a" * n
        old = best_of(1, lambda s=letters: old_text(s))
        new = best_of(args.repeat, lambda s=letters: masker.text(s))
        print(
            f"  {n // 1000:>3} k chars: old {old:8.3f} s   new {new:.5f} s   "
            f"old/new {old / new:>10,.0f}x"
        )


if __name__ == "__main__":
    main()
