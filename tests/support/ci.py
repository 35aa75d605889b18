"""Skips are for developer laptops only: under CI=true a missing prerequisite is a failure."""

from __future__ import annotations

import os

import pytest


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip locally; fail under CI=true, where `make test` must have installed the prerequisite."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see tools/setup.sh)")
    pytest.skip(reason)
