"""deploy/systemd/otelgo-collector.service through `systemd-analyze verify`: not a warning.

verify exits 0 even when it ignores a line it cannot parse, so the test also requires empty output.
The unit names the installed path (/opt/otelgo-collector), which verify checks for an executable:
the test verifies a copy pointing at this checkout's collector, nothing else changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.ci import skip_or_fail_in_ci
from tests.support.collector import BINARY, REPO

UNIT = REPO / "deploy" / "systemd" / "otelgo-collector.service"
INSTALLED = "/opt/otelgo-collector/.venv/bin/otelgo-collector"


def verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        skip_or_fail_in_ci("systemd-analyze (package systemd) not installed")
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED, str(BINARY)))
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)


def test_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count(INSTALLED) == 2     # ExecStartPre and ExecStart
    proc = verify(text, tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_verify_reports_a_bad_line(tmp_path: Path) -> None:
    # what the test above relies on: a value systemd cannot parse is a line of output
    proc = verify(UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter"), tmp_path)
    assert "Failed to parse protect system value, ignoring: stricter" in proc.stdout + proc.stderr


@pytest.mark.parametrize("directive", ["CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem", "PrivateTmp",
                                       "Restart", "TimeoutStopSec", "CacheDirectory"])
def test_unit_is_hardened(directive: str) -> None:
    assert any(line.startswith(f"{directive}=") for line in UNIT.read_text().splitlines()), directive
