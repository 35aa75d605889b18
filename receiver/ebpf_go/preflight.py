"""What the receiver cannot run without, checked before it starts: BCC importable (by the compiler
child: the collector itself never imports it), the capabilities to load BPF and trace other users'
processes, and a kernel header tree for BCC (the host's, or a stub built from linux-libc-dev).

The receiver's start calls these and fails the collector's start with their one-line message;
`otelgo-collector check` (hostcheck.py) reports the same checks one line each. `import_bcc` is for
tests and benchmarks that build their own BCC objects.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from collector.errors import KernelError, PrivilegeError

STUB_HEADERS = Path("/tmp/otelgo-collector-kheaders")

# Capability bits (linux/capability.h) a BPF tracer needs; deploy/ grants these and CAP_DAC_READ_SEARCH
# (executables other users own), and tests/unit/deploy checks that it does.
CAP_SYS_PTRACE, CAP_SYS_ADMIN = 19, 21
REQUIRED_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SYS_PTRACE")
GRANTED_CAPABILITIES = (*REQUIRED_CAPABILITIES, "CAP_DAC_READ_SEARCH")


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


def missing_capabilities() -> list[str]:
    """The capabilities this process lacks to trace others: opening uprobe perf events (CAP_SYS_ADMIN:
    from 5.8 CAP_PERFMON was enough, but the kernel went back to CAP_SYS_ADMIN for the uprobe PMU,
    stable kernels included; with CAP_BPF and CAP_PERFMON alone every probe fails with EACCES, measured
    on this platform's 6.18), which also covers loading BPF and attaching sock_ops, and reading other
    users' /proc/<pid>/exe and memory (CAP_SYS_PTRACE). Empty when it may trace."""
    try:
        with open("/proc/self/status") as f:
            cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        cap_eff = 0
    has = lambda bit: bool(cap_eff >> bit & 1)  # noqa: E731
    missing = []
    if not has(CAP_SYS_ADMIN):
        missing.append("CAP_SYS_ADMIN")
    if not has(CAP_SYS_PTRACE):
        missing.append("CAP_SYS_PTRACE")
    return missing


PRIVILEGE_FIX = ("run as root, or grant `setcap cap_sys_admin,cap_sys_ptrace,cap_dac_read_search+ep` "
                 "(in a container: --pid=host with those capabilities, see deploy/)")


def check_privileges() -> None:
    """PrivilegeError unless we may load BPF programs, open uprobe perf events and read other processes."""
    missing = missing_capabilities()
    if missing:
        raise PrivilegeError(
            f"the ebpf_go receiver needs root (uid is {os.getuid()}) or the capabilities CAP_SYS_ADMIN (the "
            f"kernel opens uprobes for no less) and CAP_SYS_PTRACE; missing: {', '.join(missing)}: {PRIVILEGE_FIX}")


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


def check_bcc() -> None:
    """KernelError unless BCC is importable by the compiler child (checked without importing it:
    the collector process never loads BCC or LLVM)."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as e:
        spec, why = None, str(e)
    else:
        why = "No module named 'bcc'"
    if spec is None:
        raise KernelError(
            f"BCC is not importable ({why}): install it with `apt-get install python3-bpfcc` and make it "
            "visible to this Python (`bash tools/setup.sh` links /usr/lib/python3/dist-packages/bcc into .venv)")


def bcc_version() -> str:
    """BCC's version, read from its package files (not imported)."""
    try:
        spec = importlib.util.find_spec("bcc")
        if spec is not None and spec.origin:
            text = (Path(spec.origin).parent / "version.py").read_text()
            return text.split("=", 1)[1].strip().strip("'\"") if "=" in text else text.strip()
    except (ImportError, ValueError, OSError):
        pass
    return "unknown"
