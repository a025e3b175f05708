"""What a test needs from the machine: missing, it fails in CI (``CI=1``) and skips elsewhere.

CI installs and starts everything the suite uses (``.ci/run``), so there a missing tool
or service is a broken run, never a quietly skipped test.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = bool(os.environ.get("CI"))


def missing(what: str) -> NoReturn:
    """``what`` (a sentence saying what is missing and how to get it) is not here."""
    if IN_CI:
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what)
