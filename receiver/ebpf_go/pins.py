"""The receiver's pin directory in bpffs: /sys/fs/bpf/otelgo-<collector pid>-<component id>, where
the maps its programs share (the client probe and sk_msg, the probes of one binary) are pinned.

A pin holds a map in kernel memory after every fd on it is closed, and outlives the collector: the
receiver removes its directory at shutdown (`remove_pin_dir`), and at start those of collectors
that were killed before theirs ran (`remove_stale_pin_dirs`).
"""

from __future__ import annotations

import os
import re

from collector.component import ComponentID
from collector.errors import KernelError
from collector.telemetry import ComponentLogger

from . import hostfs

PIN_BASE = "/sys/fs/bpf"
PIN_DIR_RE = re.compile(r"^otelgo-(\d+)-")   # a receiver's pin directory: otelgo-<collector pid>-<id>


def remove_pin_dir(path: str) -> None:
    """Unlink what is pinned in `path`, then the directory (a map's memory is freed once nothing
    holds it: a pin is such a holder, and outlives the collector)."""
    try:
        for f in os.listdir(path):
            os.unlink(os.path.join(path, f))
        os.rmdir(path)
    except OSError:
        pass


def remove_stale_pin_dirs(base: str) -> list[str]:
    """Remove the pin directories of collectors that are gone (killed: no shutdown ran), so that
    their maps do not stay in kernel memory for good; returns their names. A directory whose pid
    runs is left alone: it may be another collector's (or the pid was reused: kept, the safe side).
    The pid is read in our pid namespace, the host's, as the uprobes' pid filters already need."""
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in sorted(names):
        m = PIN_DIR_RE.match(name)
        if m is None or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        remove_pin_dir(os.path.join(base, name))
        removed.append(name)
    return removed


def pin_dir_for(id: ComponentID) -> str:
    """This collector's pin directory for receiver `id`."""
    return f"{PIN_BASE}/otelgo-{os.getpid()}-{str(id).replace('/', '_')}"


def prepare_pin_dir(pin_dir: str, log: ComponentLogger) -> None:
    """Mount bpffs on its parent if nothing is mounted there, remove the stale directories beside it,
    create it; KernelError if it cannot be created."""
    base = os.path.dirname(pin_dir)
    if hostfs.ensure_bpffs(base):
        log.info("mounted bpffs at %s (nothing was mounted there; it stays mounted)", base)
    stale = remove_stale_pin_dirs(base)
    if stale:
        log.info("removed the BPF maps pinned by %d collector(s) that exited without cleaning up: %s",
                 len(stale), ", ".join(stale))
    try:
        os.makedirs(pin_dir, exist_ok=True)
    except OSError as e:
        raise KernelError(f"cannot create the pin directory {pin_dir}: {e.strerror}") from None
