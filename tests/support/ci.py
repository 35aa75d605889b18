"""Skips are for developer laptops only: under CI=true a missing prerequisite is a failure."""

from __future__ import annotations

import os

import pytest


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip locally; fail under CI=true, where `make test` must have installed the prerequisite."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI installs it: see tools/setup.sh)")
    pytest.skip(reason)


def needs_root(reason: str = "needs root and eBPF") -> list[pytest.MarkDecorator]:
    """Marks of a test that loads BPF or reads other processes: `root`, and skipped when not root,
    unless CI=true, where it must run."""
    return [pytest.mark.root,
            pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason=reason)]
