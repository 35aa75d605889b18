"""The kernel file systems the receiver needs, found in /proc/self/mounts and mounted where missing.

A new host (a container, a VM without systemd) may have nothing mounted at /sys/fs/bpf or
/sys/kernel/security, and its cgroup v2 may sit at /sys/fs/cgroup/unified: never assume a mount.

| file system | where          | why the receiver needs it                               | if missing        |
|-------------|----------------|---------------------------------------------------------|-------------------|
| bpf         | /sys/fs/bpf    | pinned maps shared by the probes of a binary and sk_msg  | mounted (required)|
| securityfs  | /sys/kernel/security | the lockdown mode, which decides propagation      | mounted, else "unknown" |
| cgroup2     | found anywhere | sock_ops + sk_msg propagation attach to its root         | sk_msg is off     |

tracefs and debugfs are not needed: uprobes are opened through the perf PMU (perf_event_open on
/sys/bus/event_source/devices/uprobe), never through uprobe_events files.
The receiver leaves what it mounted in place at shutdown, as systemd would have: an unmount could
take away the pins of another BPF tool.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from collector.errors import KernelError

BPFFS = "/sys/fs/bpf"
SECURITYFS = "/sys/kernel/security"
LOCKDOWN_FILE = SECURITYFS + "/lockdown"


@dataclass(frozen=True)
class Mount:
    source: str
    path: str
    fstype: str


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts(path: str = "/proc/self/mounts") -> list[Mount]:
    """The mounts of this process's mount namespace, in mount order (a later one hides an earlier)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append(Mount(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
    return out


def mounted_type(path: str) -> str | None:
    """The file system type mounted at exactly `path` (the last mount there), or None."""
    found = None
    for m in mounts():
        if m.path == path:
            found = m.fstype
    return found


def find_mount(fstype: str) -> str | None:
    """Where a file system of `fstype` is mounted (the first one), or None."""
    return next((m.path for m in mounts() if m.fstype == fstype), None)


def mount(fstype: str, path: str) -> None:
    """mount(2) `fstype` at `path` (no options). OSError with the errno on failure."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(fstype.encode(), path.encode(), fstype.encode(), ctypes.c_ulong(0), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def ensure_mounted(fstype: str, path: str) -> bool:
    """Mount `fstype` at `path` unless it is mounted there already; True when this call mounted it."""
    if mounted_type(path) == fstype:
        return False
    mount(fstype, path)
    return True


def _mount_hint(fstype: str, path: str, e: OSError) -> str:
    if e.errno in (errno.EPERM, errno.EACCES):
        why = "needs CAP_SYS_ADMIN; in a container run with --privileged or bind-mount it: -v {p}:{p}"
    elif e.errno == errno.ENOENT:
        why = "the directory does not exist (is /sys mounted?); in a container bind-mount it: -v {p}:{p}"
    else:
        why = "mount it first"
    return (f"{fstype} is not mounted at {path} and mounting it failed ({e.strerror}): "
            f"{why.format(p=path)}, or run `mount -t {fstype} {fstype} {path}`")


def ensure_bpffs(path: str = BPFFS) -> bool:
    """bpffs at `path`, mounted here if missing (True then); KernelError naming the fix if it cannot be."""
    try:
        return ensure_mounted("bpf", path)
    except OSError as e:
        raise KernelError(_mount_hint("bpf", path, e)) from None


def ensure_securityfs(path: str = SECURITYFS) -> bool:
    """securityfs at `path`, mounted here if missing (True then). OSError if it cannot be: the
    caller goes on without the lockdown file (the probe_write test-load still decides)."""
    return ensure_mounted("securityfs", path)


def read_lockdown(path: str = LOCKDOWN_FILE) -> str | None:
    """The active lockdown mode (`none`, `integrity`, `confidentiality`), or None when the kernel has
    no lockdown LSM or securityfs is not there. The file reads like `none [integrity] confidentiality`."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


LOCKDOWN_MEANING = {
    "none": "bpf_probe_write_user allowed: traceparent can be written into the process (probe_write)",
    "integrity": "bpf_probe_write_user refused: traceparent goes in at the socket (sk_msg) or spans are "
                 "stitched",
    "confidentiality": "bpf_probe_write_user refused: traceparent goes in at the socket (sk_msg) or spans are "
                       "stitched",
}


def cgroup2_root() -> str | None:
    """Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or `.../unified` on hybrid hosts)."""
    return find_mount("cgroup2")
