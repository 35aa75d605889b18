"""Can this kernel run `bpf_probe_write_user`? Answered by test-loading a tiny program.

Lockdown (integrity or confidentiality) refuses the helper at load time; securityfs may not be
mounted and a missing lockdown file says nothing (ebpf-on-this-platform.md §6.2), so loading is the
only reliable test; the lockdown mode, when readable, only explains a refusal. The program is assembled here
and loaded with bpf(2) directly (no compiler, no BCC in the collector process); it is never
attached, and its fd is closed at once. A control program without the call is loaded first, so a
refusal of the helper is told apart from bpf(2) refusing everything (no privilege, no BPF).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from .. import hostfs

SYS_BPF = 321                   # x86-64
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_KPROBE = 2        # the type of uprobe programs
HELPER_PROBE_WRITE_USER = 36
LOG_SIZE = 1 << 16


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction (struct bpf_insn)."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


# r0 = 0; exit
CONTROL = insn(0xB7, 0, imm=0) + insn(0x95)
# *(u64 *)(r10 - 8) = 0; r1 = r10 - 8; r2 = r10 - 8; r3 = 8; call bpf_probe_write_user; r0 = 0; exit
TEST = b"".join([
    insn(0x7A, 10, off=-8, imm=0),                  # st   [r10-8], 0        (BPF_ST|BPF_MEM|BPF_DW)
    insn(0xBF, 1, 10),                              # mov  r1, r10           (ALU64|MOV|X)
    insn(0x07, 1, imm=-8),                          # add  r1, -8            (ALU64|ADD|K)
    insn(0xBF, 2, 10),                              # mov  r2, r10
    insn(0x07, 2, imm=-8),                          # add  r2, -8
    insn(0xB7, 3, imm=8),                           # mov  r3, 8             (ALU64|MOV|K)
    insn(0x85, imm=HELPER_PROBE_WRITE_USER),        # call 36
    insn(0xB7, 0, imm=0),                           # mov  r0, 0
    insn(0x95),                                     # exit
])


class _ProgLoadAttr(ctypes.Structure):
    """The leading fields of union bpf_attr for BPF_PROG_LOAD (the kernel zero-fills the rest)."""

    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16)]


@dataclass(frozen=True)
class LoadResult:
    fd: int          # >= 0 when loaded (the caller closes it), else -1
    errno: int       # 0 when loaded
    log: str         # the verifier's output (requested on failure only)

    @property
    def reason(self) -> str:
        """The verifier's last line before its statistics, else the errno's name and text."""
        lines = [ln.strip() for ln in self.log.splitlines()
                 if ln.strip() and not ln.startswith(("processed ", "verification time", "stack depth"))]
        if lines:
            return lines[-1]
        return f"{errno.errorcode.get(self.errno, str(self.errno))}: {os.strerror(self.errno)}"


def _kernel_version() -> int:
    """LINUX_VERSION_CODE of the running kernel (kprobe programs needed it before 5.0)."""
    parts = (os.uname().release.split("-")[0].split(".") + ["0", "0"])[:3]
    nums = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts]
    return (nums[0] << 16) | (nums[1] << 8) | min(nums[2], 255)


def prog_load(insns: bytes, name: bytes, log: bool = True) -> LoadResult:
    """BPF_PROG_LOAD of a kprobe-type program; with `log`, a refusal carries the verifier's output."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    buf = ctypes.create_string_buffer(LOG_SIZE if log else 1)
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_KPROBE, insn_cnt=len(insns) // 8,
                         insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                         log_level=1 if log else 0, log_size=LOG_SIZE if log else 0,
                         log_buf=ctypes.addressof(buf) if log else 0, kern_version=_kernel_version(),
                         prog_name=name[:15])
    fd = syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        return LoadResult(int(fd), 0, "")
    err = ctypes.get_errno()
    return LoadResult(-1, err, buf.value.decode(errors="replace") if log else "")


@dataclass(frozen=True)
class Capability:
    supported: bool
    reason: str          # one line for the operator
    verifier: str = ""   # the verifier's refusal line, when the kernel refused the helper


def check() -> Capability:
    """Load the control program, then the one calling bpf_probe_write_user; close both at once."""
    control = prog_load(CONTROL, b"otelgo_pwu_ctl", log=False)
    if control.fd < 0:
        return Capability(False, f"cannot load any BPF program ({control.reason}); needs root and BPF")
    os.close(control.fd)
    test = prog_load(TEST, b"otelgo_pwu_test")
    if test.fd >= 0:
        os.close(test.fd)
        return Capability(True, "a test program calling bpf_probe_write_user loaded")
    mode = hostfs.read_lockdown()
    why = f"kernel lockdown is {mode}" if mode not in (None, "none") else "kernel lockdown likely"
    return Capability(False, f"the kernel refuses bpf_probe_write_user (verifier: {test.reason}); {why}",
                      test.reason)
