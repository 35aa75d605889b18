"""What this process holds in the kernel, to prove that a component stopped leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess

from receiver.ebpf_go.propagation.skmsg import cgroup2_root


def open_fds() -> set[str]:
    """What this process has open, as "fd:target" (maps, programs, links, perf events, files)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}:{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


def sock_ops_on_root() -> list[int]:
    """Ids of the sock_ops programs attached to the cgroup v2 root (bpftool), whoever attached them."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup2_root()], capture_output=True, text=True,
                         check=True)
    return sorted(p["id"] for p in json.loads(out.stdout.strip() or "[]") if "sock_ops" in str(p.get("attach_type")))


def uprobes_held(pid: int) -> list[dict[str, object]]:
    """The uprobes process `pid` holds: perf events on the uprobe PMU (bpftool) and every offset of
    its uprobe_multi links (their /proc/<pid>/fdinfo lists path, pid and offsets)."""
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True)
    held: list[dict[str, object]] = [e for e in json.loads(out.stdout or "[]")
                                     if e.get("pid") == pid and e.get("fd_type") == "uprobe"]
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:   # the process is gone: its links went with it
        fds = []
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf_link":
                continue
            info = open(f"/proc/{pid}/fdinfo/{fd}").read().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in info if ":\t" in line)
        if fields.get("link_type") != "uprobe_multi":
            continue
        rows = info[info.index(next(ln for ln in info if ln.startswith("cookie"))) + 1:]
        for row in rows:
            held.append({"fd": int(fd), "filename": fields.get("path"), "offset": int(row.split()[1], 16),
                         "target_pid": int(fields.get("pid", "0"))})
    return held
