"""The exceptions this package raises for a binary it cannot use."""

from __future__ import annotations


class BinaryError(Exception):
    """A file is not a Go executable we can read. `str(err)` is a one-line message for the user."""


class NotGoBinary(BinaryError):
    """A readable executable that was not built by Go (no Go build info): skipped, not an error."""
