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
