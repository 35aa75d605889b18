"""BCC: checks that it can run here, kernel headers, compiling one program per binary, attaching.

Everything that touches BCC directly lives here, so the rest of the receiver is testable without it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.errors import KernelError, PrivilegeError

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
STUB_HEADERS = Path("/tmp/otelgo-collector-kheaders")

# Capability bits (linux/capability.h) a BPF tracer needs.
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def import_bcc() -> Any:
    """The bcc module, or KernelError saying how to install it."""
    try:
        import bcc  # type: ignore[import-not-found]
    except ImportError as e:
        raise KernelError(
            f"BCC is not importable ({e}): install it with `apt-get install python3-bpfcc` and make it "
            "visible to this Python (`bash tools/setup.sh` links /usr/lib/python3/dist-packages/bcc into .venv)"
        ) from None
    return bcc


def check_privileges() -> None:
    """PrivilegeError unless we may load BPF programs and open uprobe perf events."""
    try:
        with open("/proc/self/status") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    has = lambda bit: bool(cap_eff >> bit & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    missing = [n for n, b in (("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON), ("CAP_SYS_ADMIN", CAP_SYS_ADMIN))
               if not has(b)]
    raise PrivilegeError(
        f"the ebpf_go receiver needs root (uid is {os.getuid()}) or the capabilities CAP_BPF and CAP_PERFMON "
        f"(or CAP_SYS_ADMIN), plus CAP_DAC_READ_SEARCH/CAP_SYS_PTRACE to read other processes; missing: "
        f"{', '.join(missing)}. Run as root or `setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search+ep`")


def _usable_tree(path: Path) -> bool:
    return (path / "include" / "linux" / "kconfig.h").exists()


def find_kernel_headers(setting: str) -> tuple[str | None, str]:
    """(BCC_KERNEL_SOURCE to set or None for BCC's default, description). KernelError if none.

    `auto`: /lib/modules/$(uname -r)/build (BCC's own default), then /usr/src/linux-headers-*, then a
    stub tree built from the UAPI headers of linux-libc-dev (enough for uprobe-only programs, which
    read no kernel structs; see docs reference ebpf-on-this-platform §8.3).
    """
    if setting != "auto":
        p = Path(setting)
        if _usable_tree(p):
            return str(p), f"kernel headers from {p}"
        raise KernelError(f"kernel_headers: {p} is not a kernel header tree (no include/linux/kconfig.h)")
    tried = []
    build = Path(f"/lib/modules/{platform.release()}/build")
    tried.append(str(build))
    # Debian splits a header package in <ver>-amd64 (build tree) and <ver>-common (sources); BCC
    # reads /lib/modules/.../build and .../source together.
    if build.is_dir() and (_usable_tree(build) or _usable_tree(build.parent / "source")):
        return None, f"kernel headers from {build.resolve()}"
    for cand in sorted(glob.glob("/usr/src/linux-headers-*"), reverse=True):
        tried.append(cand)
        if _usable_tree(Path(cand)) and (Path(cand) / "include" / "generated" / "autoconf.h").exists():
            return cand, f"kernel headers from {cand}"
    tried.append("a stub tree from /usr/include (linux-libc-dev)")
    try:
        return str(build_stub_headers()), f"stub kernel headers built from linux-libc-dev in {STUB_HEADERS}"
    except OSError as e:
        raise KernelError(
            f"no usable kernel headers: tried {', '.join(tried)} ({e}); install linux-headers-amd64 or "
            "linux-libc-dev, or set kernel_headers to a header tree") from None


def build_stub_headers(dest: Path = STUB_HEADERS) -> Path:
    """A minimal header tree for BCC from the UAPI headers in /usr/include (reference §8.3)."""
    if (dest / ".complete").exists():
        return dest
    src_linux, src_generic = Path("/usr/include/linux"), Path("/usr/include/asm-generic")
    src_asm = Path("/usr/include/x86_64-linux-gnu/asm")
    for p in (src_linux, src_generic, src_asm):
        if not p.is_dir():
            raise OSError(f"{p} missing")
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_linux, tmp / "include/uapi/linux")
    shutil.copytree(src_generic, tmp / "include/uapi/asm-generic")
    shutil.copytree(src_asm, tmp / "arch/x86/include/uapi/asm")
    (tmp / "include/uapi/linux/bpf.h").write_text("/* BCC brings its own bpf.h */\n")
    (tmp / "include/linux").mkdir(parents=True)
    (tmp / "include/linux/kconfig.h").write_text("#define CONFIG_BPF_SYSCALL 1\n#define CONFIG_X86_64 1\n")
    rel = platform.release().split("-")[0].split(".")
    major, minor, patch = (int(x) if x.isdigit() else 0 for x in (rel + ["0", "0"])[:3])
    (tmp / "include/linux/version.h").write_text(
        f"#define LINUX_VERSION_CODE {(major << 16) + (minor << 8) + min(patch, 255)}\n"
        "#define KERNEL_VERSION(a,b,c) (((a) << 16) + ((b) << 8) + ((c) > 255 ? 255 : (c)))\n")
    (tmp / "include/linux/log2.h").write_text("\n")
    (tmp / "arch/x86/include/asm").mkdir(parents=True)
    (tmp / "arch/x86/include/asm/page.h").write_text("#define PAGE_SIZE 4096\n")
    (tmp / "include/linux/types.h").write_text(
        "#ifndef _OTELGO_STUB_TYPES_H\n#define _OTELGO_STUB_TYPES_H\n#include <uapi/linux/types.h>\n"
        "typedef __u8 u8; typedef __u16 u16; typedef __u32 u32; typedef __u64 u64;\n"
        "typedef __s8 s8; typedef __s16 s16; typedef __s32 s32; typedef __s64 s64;\n"
        "typedef _Bool bool; typedef unsigned long size_t; typedef long ssize_t;\n"
        "typedef unsigned long uintptr_t;\n#endif\n")
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@dataclass
class Program:
    """One compiled BPF program (one probe module, one binary) and its perf-event links."""

    bpf: Any
    source: str
    compile_seconds: float
    # pid -> BCC event names of the uprobes attached for that pid
    links: dict[int, list[bytes]] = field(default_factory=dict)

    def link_count(self) -> int:
        return sum(len(v) for v in self.links.values())


def compile_program(source: Path, cflags: list[str], kernel_source: str | None) -> Program:
    """Compile with BCC; KernelError with the compiler's or verifier's message on failure."""
    bcc = import_bcc()
    if kernel_source:
        os.environ["BCC_KERNEL_SOURCE"] = kernel_source
    t0 = time.monotonic()
    with _stderr_captured() as captured:
        try:
            b = bcc.BPF(src_file=str(source).encode(), cflags=[f"-I{BPF_DIR}", *cflags])
            failure = None
        except Exception as e:  # BCC raises plain Exception; clang's diagnostics went to stderr
            failure = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
    text = captured()
    if failure is not None:
        errors = [ln.strip() for ln in text.splitlines() if "error:" in ln]
        raise KernelError(f"BPF compile of {source.name} failed: {errors[0] if errors else failure}"
                          + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")) from None
    if text.strip():
        sys.stderr.write(text)
    _return_freed_memory()
    return Program(b, source.name, time.monotonic() - t0)


def _return_freed_memory() -> None:
    """clang/LLVM frees most of what a compile allocated, but glibc keeps it in its arenas: hand it
    back to the kernel (measured: about 40 MB of resident memory after one compile)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_STDERR_LOCK = threading.Lock()


@contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Capture what C code writes to fd 2 (clang's diagnostics) while BCC compiles. Anything else
    written meanwhile is captured too and replayed by the caller, so nothing is lost."""
    with _STDERR_LOCK, tempfile.TemporaryFile(mode="w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        result: list[str] = []
        try:
            yield lambda: result[0] if result else ""
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            result.append(tmp.read().decode("utf-8", "replace"))


def attach(prog: Program, pid: int, attach_fn: Callable[[Any, int], Any]) -> Any:
    """Run a probe module's attach(bpf, pid) and remember the uprobes it created for this pid, even
    when it fails half-way (so that they can be detached). Load/verifier errors become KernelError."""
    before = set(prog.bpf.uprobe_fds)
    try:
        return attach_fn(prog.bpf, pid)
    except Exception as e:
        if type(e).__name__ == "ProbeUnavailable":
            raise
        raise KernelError(f"attaching {prog.source} failed: {str(e).strip().splitlines()[-1] if str(e) else e!r}") \
            from None
    finally:
        new = [k for k in prog.bpf.uprobe_fds if k not in before]
        if new:
            prog.links.setdefault(pid, []).extend(new)


def detach_pid(prog: Program, pid: int) -> int:
    """Close this pid's uprobe perf events. BCC's detach_uprobe also writes tracefs uprobe_events,
    which its PMU attach never used (and which may not be mounted): we close the fds ourselves."""
    from bcc import lib  # type: ignore[import-not-found]
    n = 0
    for ev_name in prog.links.pop(pid, []):
        fd = prog.bpf.uprobe_fds.get(ev_name)
        if fd is not None:
            lib.bpf_close_perf_event_fd(fd)
            prog.bpf._del_uprobe_fd(ev_name)
            n += 1
    return n


def close_program(prog: Program) -> None:
    """Detach every pid, then free maps, programs and the ring buffer."""
    for pid in list(prog.links):
        detach_pid(prog, pid)
    release_bpf(prog.bpf)


def release_bpf(bpf: Any) -> None:
    """Close every uprobe of a BCC object, then free it. BCC's own cleanup() also edits tracefs
    uprobe_events, which its PMU attach never used and which may not be mounted (it then raises)."""
    from bcc import lib
    for ev_name, fd in list(bpf.uprobe_fds.items()):
        lib.bpf_close_perf_event_fd(fd)
        bpf._del_uprobe_fd(ev_name)
    bpf.cleanup()
