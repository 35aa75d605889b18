"""`otelgo-collector check`: what this host allows the eBPF receiver, one line each, with the fix.

Run it before the first start, or when nothing is traced. It changes nothing on the host: what it
would have to mount to find out (bpffs, securityfs) is tried in a child process in a private mount
namespace of its own, which vanishes with it. Exit 0 when tracing can work here, 1 otherwise
(a line marked "required" failed).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

from collector.errors import UserError

from . import hostfs, preflight
from .propagation import probe_write

MIN_KERNEL = (5, 8)   # BPF ring buffers (the probes' only way out)
UPROBE_PMU = "/sys/bus/event_source/devices/uprobe/type"
BTF = "/sys/kernel/btf/vmlinux"
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000


@dataclass(frozen=True)
class Line:
    name: str
    ok: bool
    detail: str
    required: bool = True   # False: tracing works without it, something optional does not

    def render(self) -> str:
        mark = "✓" if self.ok else "✗"
        tail = "" if self.ok or self.required else " (optional)"
        return f"{mark} {self.name}: {self.detail}{tail}"


def in_private_mount_namespace(fn: Callable[[], str]) -> str:
    """Run `fn` in a forked child that first unshares its mount namespace (mounts made there are
    never seen by the host); its result, or `error: <why>`. For a short-lived, single-threaded
    command only (fork)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        os.close(r)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS): " + os.strerror(ctypes.get_errno()))
            if libc.mount(b"none", b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None) != 0:
                raise OSError(ctypes.get_errno(), "making / private: " + os.strerror(ctypes.get_errno()))
            out = fn()
        except BaseException as e:  # the parent reads the reason; the child must not unwind
            out = f"error: {getattr(e, 'strerror', None) or e}"
        os.write(w, out.encode()[:4096])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return out


def check_privileges() -> Line:
    missing = preflight.missing_capabilities()
    if not missing:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()} with CAP_SYS_ADMIN and CAP_SYS_PTRACE"
        return Line("privileges", True, who)
    return Line("privileges", False, f"uid {os.geteuid()} lacks {', '.join(missing)}: {preflight.PRIVILEGE_FIX}")


def check_kernel() -> Line:
    release = platform.release()
    nums = []
    for part in release.split("-")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits or 0))
    version = tuple(nums + [0, 0])[:2]
    if version >= MIN_KERNEL:
        return Line("kernel", True, f"{release} (BPF ring buffers need {MIN_KERNEL[0]}.{MIN_KERNEL[1]})")
    return Line("kernel", False, f"{release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}, which BPF ring "
                                 "buffers need: upgrade the kernel")


def check_btf() -> Line:
    if os.path.exists(BTF):
        return Line("BTF", True, f"{BTF} present", required=False)
    return Line("BTF", False, f"no {BTF}: not needed for uprobes with BCC (kernel headers are used instead)",
                required=False)


def check_uprobes() -> Line:
    if os.path.exists(UPROBE_PMU):
        return Line("uprobes", True, "the uprobe perf PMU is there (no tracefs or debugfs needed)")
    return Line("uprobes", False, f"no {UPROBE_PMU}: the kernel is built without CONFIG_UPROBE_EVENTS; "
                                  "use a kernel with uprobes (every distribution kernel has them)")


def check_bpffs() -> Line:
    kind = hostfs.mounted_type(hostfs.BPFFS)
    if kind == "bpf":
        return Line("bpffs", True, f"mounted at {hostfs.BPFFS}")

    def try_mount() -> str:
        hostfs.mount("bpf", hostfs.BPFFS)
        return "ok"
    got = in_private_mount_namespace(try_mount)
    if got == "ok":
        return Line("bpffs", True, f"not mounted at {hostfs.BPFFS}; mountable: the collector mounts it at start")
    return Line("bpffs", False, f"not mounted at {hostfs.BPFFS} and cannot be mounted ({got.removeprefix('error: ')}):"
                                f" run `mount -t bpf bpf {hostfs.BPFFS}` as root, or in a container bind-mount it "
                                f"(-v {hostfs.BPFFS}:{hostfs.BPFFS}) or run --privileged")


def check_cgroup2() -> Line:
    root = hostfs.cgroup2_root()
    if root is not None:
        return Line("cgroup v2", True, f"at {root} (sk_msg propagation attaches sock_ops to its root)", required=False)
    return Line("cgroup v2", False, "not mounted: sk_msg propagation is off, cross-service traces are joined only "
                                    "between processes on this host (stitch); mount it with "
                                    "`mount -t cgroup2 none /sys/fs/cgroup/unified`", required=False)


def lockdown_mode() -> tuple[str | None, str]:
    """(mode, where it was read from): read in place, else in a private mount namespace."""
    mode = hostfs.read_lockdown()
    if mode is not None or hostfs.mounted_type(hostfs.SECURITYFS) == "securityfs":
        return mode, hostfs.LOCKDOWN_FILE

    def read() -> str:
        hostfs.mount("securityfs", hostfs.SECURITYFS)
        return hostfs.read_lockdown() or "absent"
    got = in_private_mount_namespace(read)
    if got.startswith("error:") or got == "absent":
        return None, got
    return got, f"{hostfs.LOCKDOWN_FILE}, securityfs mounted in a private namespace"


def check_lockdown() -> Line:
    mode, where = lockdown_mode()
    if mode is not None:
        return Line("lockdown", True, f"{mode}: {hostfs.LOCKDOWN_MEANING.get(mode, 'unknown mode')}",
                    required=False)
    pw = probe_write.check()   # no lockdown file: the test-load is the answer
    detail = ("unknown (no lockdown file: " + where.removeprefix("error: ") + "); " + pw.reason)
    return Line("lockdown", True, detail, required=False)


def check_headers() -> Line:
    try:
        _, how = preflight.find_kernel_headers("auto")
    except UserError as e:
        return Line("kernel headers", False, str(e))
    return Line("kernel headers", True, how)


def check_bcc() -> Line:
    try:
        preflight.check_bcc()
    except UserError as e:
        return Line("BCC", False, str(e))
    return Line("BCC", True, f"importable (version {preflight.bcc_version()})")


CHECKS: tuple[Callable[[], Line], ...] = (
    check_privileges, check_kernel, check_btf, check_uprobes, check_bpffs, check_cgroup2, check_lockdown,
    check_headers, check_bcc,
)


def main(argv: list[str]) -> int:
    if argv:
        print(f"check: unexpected argument {argv[0]!r}: `otelgo-collector check` takes none", file=sys.stderr)
        return 2
    lines = [c() for c in CHECKS]
    print("otelgo-collector check: what this host allows the ebpf_go receiver")
    for ln in lines:
        print("  " + ln.render())
    failed = [ln.name for ln in lines if ln.required and not ln.ok]
    if failed:
        print(f"tracing cannot work here: fix {', '.join(failed)}")
        return 1
    print("tracing can work here")
    return 0
