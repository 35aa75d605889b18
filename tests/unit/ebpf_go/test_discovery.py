"""Process discovery: /proc parsing, selectors, new/exited diffs, clock offset."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from receiver.ebpf_go import discovery, events
from receiver.ebpf_go.discovery import ProcessWatcher, Selector, read_proc


def test_read_proc_of_this_process() -> None:
    p = read_proc(os.getpid())
    assert p is not None and p.exe == os.path.realpath(sys.executable)
    st = os.stat(sys.executable)
    assert p.binary_key == (st.st_dev, st.st_ino) and p.start_ticks > 0
    assert read_proc(2**22 + 1) is None


def test_selectors() -> None:
    p = read_proc(os.getpid())
    assert p is not None
    assert Selector().matches(p)
    assert Selector(pid=[os.getpid()]).matches(p)
    assert not Selector(pid=[1]).matches(p)
    assert Selector(exe_path=os.path.dirname(p.exe) + "/*").matches(p)
    assert not Selector(exe_path="/nowhere/*").matches(p)
    assert Selector(name="python").matches(p)
    assert not Selector(name="^definitely-not$").matches(p)
    assert not Selector(pid=[os.getpid()], name="^nope$").matches(p)  # every condition must hold


def test_open_ports_selector() -> None:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        p = read_proc(os.getpid())
        assert p is not None
        assert port in discovery.listening_ports(os.getpid())
        assert Selector(open_ports=[port]).matches(p)
        assert not Selector(open_ports=[1]).matches(p)
    finally:
        s.close()


def test_watcher_sees_new_and_exited() -> None:
    w = ProcessWatcher(exclude_pids={os.getpid()})
    w.poll()
    child = subprocess.Popen(["sleep", "30"], env={**os.environ, "OTEL_SERVICE_NAME": "sleepy"})
    try:
        new, _ = w.poll()
        (info,) = [p for p in new if p.pid == child.pid]
        assert w.still_same(info)
        assert discovery.read_environ(child.pid, "OTEL_SERVICE_NAME") == "sleepy"
        assert "sleep 30" in discovery.read_cmdline(child.pid)
    finally:
        child.kill()
        child.wait()
    _, gone = w.poll()
    assert child.pid in gone
    assert os.getpid() not in w.known


def test_clock_offset_converts_monotonic_to_wall_time() -> None:
    off = events.monotonic_to_unix_offset()
    assert abs(time.monotonic_ns() + off - time.time_ns()) < 5_000_000
