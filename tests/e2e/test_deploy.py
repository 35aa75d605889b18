"""What deploy/ promises, on this host:

- the collector runs with exactly the capabilities the systemd unit and the DaemonSet grant
  (`setpriv --bounding-set`, and `no_new_privs` as the unit sets it): it traces a chain of services,
  joins their traces at the socket (sk_msg), and stops on SIGTERM with exit 0 within the unit's
  TimeoutStopSec; without CAP_SYS_ADMIN it refuses to start and says what to grant;
- the container image's install step (`tools/setup.sh --runtime`, deploy/docker/Dockerfile) makes a
  working collector from the files the Dockerfile copies, without the test tools.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.spans import KIND_SERVER, from_json_dict
from tests.support.ci import needs_root, skip_or_fail_in_ci
from tests.support.collector import BINARY, REPO, CollectorProcess, free_port, json_lines, wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.httpchain import Chain

pytestmark = [*needs_root(), pytest.mark.timeout(600)]

UNIT = (REPO / "deploy" / "systemd" / "otelgo-collector.service").read_text()


def unit_value(key: str) -> str:
    m = re.search(rf"^{key}=(.+)$", UNIT, re.M)
    assert m is not None, key
    return m.group(1)


def setpriv(caps: list[str]) -> tuple[str, ...]:
    if shutil.which("setpriv") is None:
        skip_or_fail_in_ci("setpriv (util-linux) not installed")
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return ("setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all")


def config(binary: Path, out: Path) -> dict[str, Any]:
    return {"receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary)}], "discovery_interval": "200ms",
                                      "instrumentations": {"database_sql": False}}},
            "exporters": {"file": {"path": str(out), "flush_interval": "100ms"}},
            "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}


def instrumented(col: CollectorProcess) -> float:
    for line in col.scrape().splitlines():
        if line.startswith("otelgo_ebpf_processes_instrumented "):
            return float(line.split()[1])
    return 0.0


def test_runs_with_the_granted_capabilities_only(tmp_path: Path) -> None:
    caps = unit_value("CapabilityBoundingSet").split()
    binary = tmp_path / "httpchain"
    shutil.copy(build_go_fixture("httpchain", "1.26"), binary)
    out = tmp_path / "spans.jsonl"
    chain = Chain()
    chain.start(binary)
    try:
        col = CollectorProcess(config(binary, out), tmp_path, wrapper=setpriv(caps))
        try:
            status = Path(f"/proc/{col.proc.pid}/status").read_text()
            bnd = int(re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
            assert bin(bnd).count("1") == len(caps), status      # the bounding set took
            wait_for(lambda: instrumented(col) == 3, 60, "three processes traced")
            body = chain.get("caps")
            assert re.findall(rb"[BC] tp=(\S+)", body), body       # sk_msg put a traceparent on both hops
            wait_for(lambda: len([s for d in json_lines(out) for _, _, s in from_json_dict(d).iter_spans()]) >= 5,
                     30, "five spans")
            spans = [s for d in json_lines(out) for _, _, s in from_json_dict(d).iter_spans()]
            assert len({s.trace_id for s in spans}) == 1, spans
            assert sum(s.kind == KIND_SERVER for s in spans) == 3
            assert "propagation mode sk_msg (requested auto)" in col.log()
            assert " warn" not in col.log() and "error" not in col.log(), col.log()[-3000:]
        finally:
            timeout = float(unit_value("TimeoutStopSec").removesuffix("s"))
            t0 = time.monotonic()
            rc = col.stop(timeout=timeout)
            took = time.monotonic() - t0
        assert rc == 0, col.log()[-3000:]
        print(f"SIGTERM to exit: {took:.2f} s (TimeoutStopSec={timeout:.0f}s)")
    finally:
        chain.stop()


def test_without_cap_sys_admin_it_says_what_to_grant(tmp_path: Path) -> None:
    caps = [c for c in unit_value("CapabilityBoundingSet").split() if c != "CAP_SYS_ADMIN"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp_path / "none", tmp_path / "out.jsonl")))
    proc = subprocess.run([*setpriv(caps), str(BINARY), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("failed to start \"ebpf_go\" receiver: the ebpf_go receiver needs root (uid is 0) or the "
            "capabilities CAP_SYS_ADMIN (the kernel opens uprobes for no less) and CAP_SYS_PTRACE; missing: "
            "CAP_SYS_ADMIN: run as root, or grant `setcap cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep` "
            "(in a container: --pid=host with those capabilities, see deploy/)") in proc.stdout + proc.stderr


def dockerfile_copies() -> list[str]:
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("COPY "):
            out += line.split()[1:-1]
    return out


def test_image_install_step_makes_a_working_collector(tmp_path: Path) -> None:
    """The Dockerfile's COPY lines and RUN step, in a scratch directory instead of an image."""
    root = tmp_path / "image"
    root.mkdir()
    for src in dockerfile_copies():
        s = REPO / src.rstrip("/")
        if s.is_dir():
            shutil.copytree(s, root / s.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(s, root / s.name)
    proc = subprocess.run(["bash", "tools/setup.sh", "--runtime"], cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = root / ".venv" / "bin"
    comps = subprocess.run([str(venv / "otelgo-collector"), "components"], capture_output=True, text=True,
                           timeout=60)
    assert comps.returncode == 0 and "ebpf_go" in comps.stdout, comps.stderr
    val = subprocess.run([str(venv / "otelgo-collector"), "validate", "--config", str(root / "config.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert (val.returncode, val.stderr.strip()) == (0, "configuration is valid"), val.stdout
    # Debian's BCC is visible in the venv; the test tools are not installed
    assert subprocess.run([str(venv / "python"), "-c", "import bcc"], timeout=60).returncode == 0
    assert subprocess.run([str(venv / "python"), "-c", "import pytest"], capture_output=True,
                          timeout=60).returncode != 0
    # and it starts with the ebpf_go receiver (BCC and the kernel headers of the install work)
    cfg = tmp_path / "start.yaml"
    cfg.write_text(yaml.safe_dump({
        "receivers": {"ebpf_go": {"targets": [{"exe_path": str(tmp_path / "nothing")}]}},
        "exporters": {"debug": {}},
        "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["debug"]}},
                    "telemetry": {"metrics": {"address": f"127.0.0.1:{free_port()}"}}}}))
    log = tmp_path / "start.log"
    with open(log, "w") as f:
        col = subprocess.Popen([str(venv / "otelgo-collector"), "--config", str(cfg)], stdout=f,
                               stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "Everything is ready" in log.read_text() or col.poll() is not None, 60, "ready")
        assert col.poll() is None, log.read_text()[-3000:]
    finally:
        col.terminate()
        rc = col.wait(60)
    assert rc == 0, log.read_text()[-3000:]
