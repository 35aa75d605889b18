"""Process discovery: /proc parsing, selectors, new/exited diffs, clock offset."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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
        seen: list[discovery.ProcInfo] = []
        for _ in range(100):   # a poll that lands inside the child's execve sees it at the next one
            seen += [p for p in w.poll()[0] if p.pid == child.pid]
            if seen:
                break
            time.sleep(0.01)
        (info,) = seen
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


def _fake_proc(root: Path, pid: int, arg_end: int) -> None:
    d = root / str(pid)
    d.mkdir(exist_ok=True)
    if not (d / "exe").is_symlink():
        (d / "exe").symlink_to("/usr/bin/sleep")
    # fields 3..52 of /proc/pid/stat; field 22 start time, field 49 arg_end
    fields = ["S"] + ["0"] * 49
    fields[22 - 3], fields[49 - 3] = "4242", str(arg_end)
    (d / "stat").write_text(f"{pid} (sleep) " + " ".join(fields) + "\n")


def test_a_process_caught_inside_execve_is_reported_once_its_arguments_are_in_place(tmp_path: Path) -> None:
    """Between the switch to the new executable and the ELF loader's setup of argv/envp, /proc shows the
    new exe with an empty cmdline and environ: a selector or OTEL_SERVICE_NAME read then would be wrong
    for the process's whole life. Such a process is reported at the first poll after the setup."""
    w = ProcessWatcher(proc=str(tmp_path))
    _fake_proc(tmp_path, 100, arg_end=0)
    assert w.poll() == ([], []) and 100 not in w.known
    assert w.poll() == ([], [])
    _fake_proc(tmp_path, 100, arg_end=0x7FFD1234)
    new, gone = w.poll()
    assert [(p.pid, p.start_ticks, p.exe, p.exec_done) for p in new] == [(100, 4242, "/usr/bin/sleep", True)]
    assert gone == [] and w.known == {100: 4242}
