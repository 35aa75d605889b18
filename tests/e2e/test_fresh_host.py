"""A fresh host, as a new user's machine is: nothing mounted at /sys/fs/bpf, /sys/kernel/security,
tracefs or debugfs. Each test runs the real CLI in a private mount namespace where those are
unmounted (`unshare -m`, then `umount`), whatever the machine running the tests has mounted; and a
receiver that cannot start must fail the collector's start.

Needs root (unshare, eBPF): marked `root`, skipped when not root unless CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from collector.spans import KIND_SERVER, Span, from_json_dict
from receiver.ebpf_go import hostfs
from tests.support.ci import needs_root, skip_or_fail_in_ci
from tests.support.collector import BINARY, CollectorProcess, free_port, json_lines, wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.goserver import Server

pytestmark = [*needs_root(), pytest.mark.timeout(300)]

# What a host without systemd lacks. Several mounts may be stacked on one path: all go.
BARE = ("/sys/fs/bpf", "/sys/kernel/security", "/sys/kernel/tracing", "/sys/kernel/debug")
BARE_HOST = ("for m in " + " ".join(BARE) + "; do while mountpoint -q $m; do umount -l $m || exit 97; done; done; "
             'exec "$@"')
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def bare_host(*cmd: str) -> list[str]:
    """`cmd` in a new private mount namespace with BARE unmounted (the host's mounts stay as they are)."""
    for tool in ("unshare", "mountpoint", "umount"):
        if shutil.which(tool) is None:
            skip_or_fail_in_ci(f"{tool} (util-linux) not installed")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", BARE_HOST, "sh", *cmd]


def host_mounts() -> list[tuple[str, str]]:
    return [(m.path, m.fstype) for m in hostfs.mounts() if m.path in BARE]


def test_bare_namespace_has_nothing_mounted() -> None:
    # The premise of every test here: inside the wrapper nothing is at those paths.
    out = subprocess.run(bare_host("cat", "/proc/self/mounts"), capture_output=True, text=True, check=True).stdout
    assert [ln for ln in out.splitlines() if ln.split()[1] in BARE] == []


def test_traces_on_a_host_without_bpffs(tmp_path: Path) -> None:
    before = host_mounts()
    binary = build_go_fixture("httpserver", "1.26", "plain")
    out = tmp_path / "spans.jsonl"
    cfg = {"receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary), "service_name": "fresh-shop"}],
                                     "discovery_interval": "100ms"}},
           "exporters": {"file": {"path": str(out)}},
           "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}
    srv = Server(binary)
    try:
        with CollectorProcess(cfg, tmp_path, wrapper=tuple(bare_host())) as col:
            log = col.log()
            assert "mounted bpffs at /sys/fs/bpf (nothing was mounted there; it stays mounted)" in log, log[-3000:]
            assert "mounted securityfs at /sys/kernel/security to read the kernel lockdown mode" in log
            assert "ebpf_go receiver disabled" not in log
            wait_for(lambda: "propagation mode " in col.log(), 60, "the propagation mode")
            wait_for(lambda: "net_http_server program for" in col.log(), 60, "the server probe")
            got: list[Span] = []
            n = 0

            def spans() -> list[Span]:
                return [s for doc in json_lines(out) for _, _, s in from_json_dict(doc).iter_spans()]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(got) < 3:
                srv.request("GET", f"/items/{n}", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
                n += 1
                time.sleep(0.2)
                got = spans()
            assert len(got) >= 3, f"no server spans on a host without bpffs:\n{col.log()[-3000:]}"
            log = col.log()
            assert col.stop() == 0, log[-3000:]
        # Every request sent after the probe attached is there, exactly.
        first = int(got[0].attributes["url.path"].rsplit("/", 1)[1])
        assert [s.attributes["url.path"] for s in got] == [f"/items/{i}" for i in range(first, first + len(got))]
        for s in got:
            assert (s.name, s.kind, s.trace_id.hex(), s.parent_span_id.hex()) == (
                "GET /items/{id}", KIND_SERVER, TRACE_ID, PARENT_ID)
            assert s.attributes["http.route"] == "/items/{id}"
            assert s.attributes["http.response.status_code"] == 200
        assert "kernel lockdown: " in log
    finally:
        srv.stop()
    assert host_mounts() == before, "the private namespace's mounts leaked into the host's"


def check_lines(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`check`'s lines by name: {'bpffs': '✓ bpffs: ...'}."""
    lines = proc.stdout.splitlines()
    assert lines[0] == "otelgo-collector check: what this host allows the ebpf_go receiver", proc.stdout
    return {ln.strip()[2:].split(":", 1)[0]: ln.strip() for ln in lines[1:-1]}


NAMES = ["privileges", "kernel", "BTF", "uprobes", "bpffs", "cgroup v2", "lockdown", "kernel headers", "BCC"]


def test_check_here_and_on_a_host_without_bpffs() -> None:
    before = host_mounts()
    here = subprocess.run([str(BINARY), "check"], capture_output=True, text=True, timeout=60)
    bare = subprocess.run(bare_host(str(BINARY), "check"), capture_output=True, text=True, timeout=60)
    for proc in (here, bare):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = check_lines(proc)
        assert list(lines) == NAMES
        assert proc.stdout.splitlines()[-1] == "tracing can work here"
        assert lines["privileges"] == "✓ privileges: root"
        assert lines["uprobes"] == "✓ uprobes: the uprobe perf PMU is there (no tracefs or debugfs needed)"
    assert check_lines(bare)["bpffs"] == ("✓ bpffs: not mounted at /sys/fs/bpf; mountable: the collector mounts "
                                          "it at start")
    # The lockdown mode is read (securityfs mounted in a throwaway namespace), not assumed, in both.
    assert check_lines(bare)["lockdown"] == check_lines(here)["lockdown"]
    assert not check_lines(bare)["lockdown"].startswith("✓ lockdown: unknown"), bare.stdout
    assert host_mounts() == before, "check mounted something on the host"


def test_check_without_privileges_says_what_to_grant() -> None:
    if shutil.which("setpriv") is None:
        skip_or_fail_in_ci("setpriv (util-linux) not installed")
    if not os.access(BINARY, os.X_OK) or (os.stat(BINARY.parent).st_mode & 0o005) != 0o005:
        pytest.skip("the venv is not readable by another user here")  # CI's checkout is world-readable
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           str(BINARY), "check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = check_lines(proc)
    assert lines["privileges"] == (
        "✗ privileges: uid 65534 lacks CAP_SYS_ADMIN, CAP_SYS_PTRACE: run as root, or grant `setcap "
        "cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep` (in a container: --pid=host with those "
        "capabilities, see deploy/)")
    assert proc.stdout.splitlines()[-1].startswith("tracing cannot work here: fix privileges")


def test_a_receiver_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    health = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
receivers:
  ebpf_go:
    kernel_headers: {tmp_path}/no-such-tree
exporters:
  debug: {{}}
extensions:
  health_check:
    endpoint: 127.0.0.1:{health}
service:
  extensions: [health_check]
  pipelines:
    traces: {{receivers: [ebpf_go], exporters: [debug]}}
  telemetry:
    metrics: {{address: 127.0.0.1:{free_port()}}}
""")
    proc = subprocess.Popen([str(BINARY), "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    codes = set()
    while proc.poll() is None:  # health_check must never say healthy on the way down
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/", timeout=1) as r:
                codes.add(r.status)
        except urllib.error.HTTPError as e:
            codes.add(e.code)
        except OSError:
            pass
        time.sleep(0.02)
    log = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1, log
    assert 200 not in codes, log
    errors = [ln for ln in log.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, log
    assert (f'failed to start "ebpf_go" receiver: kernel_headers: {tmp_path}/no-such-tree is not a kernel header '
            "tree (no include/linux/kconfig.h)") in errors[0]
    assert "Everything is ready" not in log and "Traceback" not in log
