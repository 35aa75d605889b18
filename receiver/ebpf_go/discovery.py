"""Processes on this host: scan /proc, notice new and exited ones, match them to target selectors.

Polling /proc is the only way without kprobes (the test kernels have none) or a netlink proc
connector (needs CAP_NET_ADMIN and a socket per collector); one scan of ~200 processes costs
about a millisecond (benchmarks/README.md, "discovery").
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    start_ticks: int      # /proc/pid/stat field 22: with the pid, identifies one process instance
    exe: str              # readlink /proc/pid/exe
    dev: int              # (dev, ino) of the executable: processes of one binary share a program
    ino: int
    comm: str
    # False while an execve is still being set up: the new executable is linked but its arguments
    # and environment (OTEL_SERVICE_NAME, selectors on them) are not in place yet.
    exec_done: bool = True

    @property
    def binary_key(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    @property
    def exe_link(self) -> str:
        """Path the kernel resolves to this process's executable, even in another mount namespace."""
        return f"/proc/{self.pid}/exe"


def read_proc(pid: int, proc: str = "/proc") -> ProcInfo | None:
    """None for kernel threads, processes gone meanwhile, or unreadable ones."""
    base = f"{proc}/{pid}"
    try:
        exe = os.readlink(f"{base}/exe")
        st = os.stat(f"{base}/exe")
        with open(f"{base}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'.
    lpar, rpar = stat.find(b"("), stat.rfind(b")")
    comm = stat[lpar + 1:rpar].decode("utf-8", "replace")
    fields = stat[rpar + 2:].split()
    try:
        start = int(fields[19])
    except (IndexError, ValueError):
        return None
    # arg_end (field 49) is 0 until the ELF loader has put argv and envp on the new stack.
    exec_done = len(fields) <= 46 or fields[46] != b"0"
    return ProcInfo(pid, start, exe, st.st_dev, st.st_ino, comm, exec_done)


def read_environ(pid: int, name: str, proc: str = "/proc") -> str | None:
    try:
        with open(f"{proc}/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode("utf-8", "replace")
    return None


def read_cmdline(pid: int, proc: str = "/proc") -> str:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def listening_ports(pid: int, proc: str = "/proc") -> set[int]:
    """TCP ports this process listens on (sockets in its fd table that are LISTEN in /proc/net/tcp*)."""
    inodes = set()
    try:
        for fd in os.listdir(f"{proc}/{pid}/fd"):
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


class Selector:
    """One `targets` entry, compiled: every condition it sets must hold."""

    def __init__(self, exe_path: str | None = None, pid: list[int] | None = None, name: str | None = None,
                 open_ports: list[int] | None = None, service_name: str | None = None,
                 attributes: dict[str, Any] | None = None) -> None:
        self.exe_path = exe_path
        self.pids = set(pid) if pid else None
        self.name = re.compile(name) if name else None
        self.open_ports = set(open_ports) if open_ports else None
        self.service_name = service_name
        self.attributes = dict(attributes or {})

    def matches(self, p: ProcInfo, proc: str = "/proc") -> bool:
        if self.pids is not None and p.pid not in self.pids:
            return False
        if self.exe_path is not None and not fnmatch.fnmatchcase(p.exe, self.exe_path):
            return False
        if self.name is not None and not (self.name.search(p.comm) or self.name.search(os.path.basename(p.exe))
                                          or self.name.search(read_cmdline(p.pid, proc))):
            return False
        if self.open_ports is not None and not (self.open_ports & listening_ports(p.pid, proc)):
            return False
        return True


class ProcessWatcher:
    """Diffs /proc between polls: `poll()` returns (new processes, exited pids)."""

    def __init__(self, proc: str = "/proc", exclude_pids: set[int] | None = None) -> None:
        self.proc = proc
        self.exclude = exclude_pids or set()
        self.known: dict[int, int] = {}   # pid -> start_ticks (0: unreadable, e.g. a kernel thread)

    def poll(self) -> tuple[list[ProcInfo], list[int]]:
        try:
            pids = {int(d) for d in os.listdir(self.proc) if d.isdigit()}
        except OSError:
            return [], []
        pids -= self.exclude
        gone = [pid for pid in self.known if pid not in pids]
        for pid in gone:
            del self.known[pid]
        new: list[ProcInfo] = []
        for pid in pids - self.known.keys():
            info = read_proc(pid, self.proc)
            if info is not None and not info.exec_done:
                continue   # caught inside execve: seen whole at the next poll
            self.known[pid] = info.start_ticks if info else 0
            if info is not None:
                new.append(info)
        return new, gone

    def still_same(self, p: ProcInfo) -> bool:
        """False when the pid now belongs to another process (reused between two polls)."""
        now = read_proc(p.pid, self.proc)
        return now is not None and now.start_ticks == p.start_ticks
