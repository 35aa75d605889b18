"""Pin directories for tests that load BPF programs themselves (BCC in the test process).

The collector mounts bpffs at start; such a test runs no collector, so it mounts it the same way
(a fresh host has nothing at /sys/fs/bpf, and a directory made there would land on sysfs)."""

from __future__ import annotations

import os

from receiver.ebpf_go import hostfs


def make_pin_dir(name: str) -> str:
    """`/sys/fs/bpf/<name>`, bpffs mounted first if missing; the caller removes the directory."""
    hostfs.ensure_bpffs()
    path = f"{hostfs.BPFFS}/{name}"
    os.makedirs(path, exist_ok=True)
    return path
