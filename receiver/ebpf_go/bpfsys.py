"""bpf(2) and perf_event_open(2) through ctypes: maps, program load, uprobe attach, pins, links.

What the collector process needs to run a compiled program image (bpfcompile.py) without BCC or
LLVM in its address space. x86-64 syscall numbers; attribute layouts from uapi/linux/bpf.h and
uapi/linux/perf_event.h (only the leading fields we set; the kernel zero-fills the rest).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

SYS_BPF = 321
SYS_PERF_EVENT_OPEN = 298

# enum bpf_cmd
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
BPF_PROG_LOAD, BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 6, 7, 8, 9
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28

# enum bpf_prog_type
PROG_KPROBE, PROG_SOCK_OPS, PROG_SK_MSG = 2, 13, 16
# enum bpf_map_type
MAP_HASH, MAP_ARRAY, MAP_PROG_ARRAY, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_SOCKHASH, MAP_RINGBUF = 1, 2, 3, 6, 9, 18, 27
PERCPU_MAPS = frozenset({5, 6, 10})  # percpu hash, percpu array, lru percpu hash
# enum bpf_attach_type
BPF_CGROUP_SOCK_OPS, BPF_SK_MSG_VERDICT = 3, 7
BPF_TRACE_UPROBE_MULTI = 48     # Linux 6.6+
BPF_F_ALLOW_MULTI = 2
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2

# ld_imm64 with src_reg BPF_PSEUDO_MAP_FD: imm holds a map fd
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1

PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int


class BpfError(OSError):
    """A bpf(2) or perf_event_open(2) call failed; `log` holds the verifier's output for loads."""

    def __init__(self, what: str, err: int, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what
        self.log = log


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    r = _syscall(SYS_BPF, cmd, attr, len(attr))
    if r < 0:
        raise BpfError(what, ctypes.get_errno())
    return int(r)


def _bpf_found(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> bool:
    """A map command that may find nothing: False on ENOENT, BpfError on any other failure."""
    if _syscall(SYS_BPF, cmd, attr, len(attr)) < 0:
        e = ctypes.get_errno()
        if e == errno.ENOENT:
            return False
        raise BpfError(what, e)
    return True


def _attr(data: bytes, size: int = 128) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(size)
    ctypes.memmove(buf, data, len(data))
    return buf


def _name16(name: str) -> bytes:
    # The kernel takes [A-Za-z0-9_.] and at most 15 characters.
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:15].encode()


# ---------------------------------------------------------------- maps


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


def map_create(spec: MapSpec) -> int:
    attr = _attr(struct.pack("<IIIIIII16s", spec.type, spec.key_size, spec.value_size, spec.max_entries,
                             spec.flags, 0, 0, _name16(spec.name)))
    try:
        return _bpf(BPF_MAP_CREATE, attr, f"creating map {spec.name}")
    except BpfError as e:
        if e.errno != errno.EINVAL:
            raise
    # Kernels before 4.15 refuse names.
    attr = _attr(struct.pack("<IIIII", spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags))
    return _bpf(BPF_MAP_CREATE, attr, f"creating map {spec.name}")


def map_info(fd: int) -> MapSpec:
    """What the kernel says about a map fd (type, sizes, entries, flags, name)."""
    info = ctypes.create_string_buffer(88)
    attr = _attr(struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "reading map info")
    typ, _id, ks, vs, me, fl, name = struct.unpack_from("<IIIIII16s", info.raw)
    return MapSpec(name.rstrip(b"\0").decode(), typ, ks, vs, me, fl)


def map_id(fd: int) -> int:
    info = ctypes.create_string_buffer(88)
    attr = _attr(struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "reading map info")
    return int(struct.unpack_from("<I", info.raw, 4)[0])


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = _attr(struct.pack("<I4xQQQ", fd, ctypes.addressof(k), ctypes.addressof(v), 0))
    return v.raw if _bpf_found(BPF_MAP_LOOKUP_ELEM, attr, "map lookup") else None


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = _attr(struct.pack("<I4xQQQ", fd, ctypes.addressof(k), ctypes.addressof(v), flags))
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")


def map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    attr = _attr(struct.pack("<I4xQ", fd, ctypes.addressof(k)))
    return _bpf_found(BPF_MAP_DELETE_ELEM, attr, "map delete")


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key or b"", key_size) if key is not None else None
    n = ctypes.create_string_buffer(key_size)
    attr = _attr(struct.pack("<I4xQQ", fd, ctypes.addressof(k) if k is not None else 0, ctypes.addressof(n)))
    return n.raw if _bpf_found(BPF_MAP_GET_NEXT_KEY, attr, "map next key") else None


def possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values hold one 8-byte-aligned slot each)."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


# ---------------------------------------------------------------- pins


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _attr(struct.pack("<QI", ctypes.addressof(p), fd)), f"pinning {path}")


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return _bpf(BPF_OBJ_GET, _attr(struct.pack("<QII", ctypes.addressof(p), 0, 0)), f"opening pinned {path}")


# ---------------------------------------------------------------- programs


def prog_load(prog_type: int, insns: bytes, license: str, name: str = "", log_size: int = 0,
              expected_attach_type: int = 0) -> int:
    """Load a program. On failure retries with the verifier log, and raises BpfError whose message
    ends with the verifier's last lines."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())

    def load(level: int, size: int) -> tuple[int, int, str]:
        log = ctypes.create_string_buffer(size) if size else None
        attr = _attr(struct.pack("<IIQQIIQII16sII", prog_type, len(insns) // 8, ctypes.addressof(code),
                                 ctypes.addressof(lic), level, size, ctypes.addressof(log) if log else 0,
                                 0, 0, _name16(name), 0, expected_attach_type))
        r = _syscall(SYS_BPF, BPF_PROG_LOAD, attr, len(attr))
        err = ctypes.get_errno() if r < 0 else 0
        return int(r), err, log.value.decode("utf-8", "replace") if log else ""

    fd, err, _ = load(0, 0)
    if fd >= 0:
        return fd
    if err == errno.EPERM:
        raise BpfError(f"loading {name}", err)
    size = log_size or 1 << 20
    fd, err2, text = load(1, size)
    while fd < 0 and err2 == errno.ENOSPC and size < 1 << 26:
        size <<= 2
        fd, err2, text = load(1, size)
    if fd >= 0:  # loaded with the log on: fine too
        return fd
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    tail = " | ".join(lines[-3:]) if lines else ""
    raise BpfError(f"loading {name}" + (f" (verifier: {tail})" if tail else ""), err2 or err, text)


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _bpf(BPF_PROG_ATTACH, _attr(struct.pack("<IIII", target_fd, prog_fd, attach_type, flags)), "attaching program")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _bpf(BPF_PROG_DETACH, _attr(struct.pack("<IIII", target_fd, prog_fd, attach_type, 0)), "detaching program")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _bpf(BPF_LINK_CREATE, _attr(struct.pack("<IIII", prog_fd, target_fd, attach_type, 0)), "creating link")


def map_fd_relocations(insns: bytes) -> list[tuple[int, int]]:
    """(instruction index, map fd) of every ld_imm64 that loads a map by fd."""
    out = []
    i, n = 0, len(insns) // 8
    while i < n:
        op, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * 8)
        if op == LD_IMM64:
            if regs >> 4 == PSEUDO_MAP_FD:
                out.append((i, imm))
            i += 2
        else:
            i += 1
    return out


def patch_imm(insns: bytearray, index: int, value: int) -> None:
    struct.pack_into("<i", insns, index * 8 + 4, value)


# ---------------------------------------------------------------- uprobes


_uprobe_type: int | None = None


def uprobe_pmu_type() -> int:
    global _uprobe_type
    if _uprobe_type is None:
        try:
            _uprobe_type = int(open("/sys/bus/event_source/devices/uprobe/type").read())
        except (OSError, ValueError) as e:
            raise BpfError("no uprobe PMU (/sys/bus/event_source/devices/uprobe/type)", errno.ENOENT) from e
    return _uprobe_type


_LOAD_SEGMENTS: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}


def load_segments(path: str) -> list[tuple[int, int, int]]:
    """(p_vaddr, p_memsz, p_offset) of the executable PT_LOAD segments of a 64-bit ELF file."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, int(st.st_mtime_ns))
    segs = _LOAD_SEGMENTS.get(key)
    if segs is not None:
        return segs
    with open(path, "rb") as f:
        eh = f.read(64)
        if eh[:4] != b"\x7fELF" or eh[4] != 2 or eh[5] != 1:
            raise BpfError(f"{path}: not a 64-bit little-endian ELF file", errno.ENOEXEC)
        phoff, = struct.unpack_from("<Q", eh, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", eh, 0x36)
        f.seek(phoff)
        ph = f.read(phentsize * phnum)
    segs = []
    for i in range(phnum):
        p_type, p_flags, p_offset, p_vaddr, _paddr, _filesz, p_memsz = struct.unpack_from("<IIQQQQQ", ph,
                                                                                       i * phentsize)
        if p_type == 1 and p_flags & 1:  # PT_LOAD, PF_X
            segs.append((p_vaddr, p_memsz, p_offset))
    _LOAD_SEGMENTS[key] = segs
    return segs


def vaddr_to_offset(path: str, vaddr: int) -> int:
    """File offset of an ELF virtual address (what the uprobe PMU takes), as BCC computes it."""
    for v, size, off in load_segments(path):
        if v <= vaddr < v + size:
            return vaddr - v + off
    raise BpfError(f"{path}: address {vaddr:#x} is in no executable segment", errno.EINVAL)


def attach_uprobe(prog_fd: int, path: str, offset: int, pid: int = -1) -> int:
    """A perf event on the uprobe PMU at `path`+`offset` for `pid` (every process: -1), running
    `prog_fd`. Closing the returned fd detaches it."""
    p = ctypes.create_string_buffer(path.encode())
    attr = ctypes.create_string_buffer(128)
    # type, size, config (0: not a retprobe), sample_period, sample_type, read_format, flags,
    # wakeup_events, bp_type, config1 (path), config2 (offset)
    struct.pack_into("<IIQQQQQIIQQ", attr, 0, uprobe_pmu_type(), 128, 0, 1, 0, 0, 0, 1, 0,
                     ctypes.addressof(p), offset)
    cpu = 0 if pid == -1 else -1
    fd = int(_syscall(SYS_PERF_EVENT_OPEN, attr, pid, cpu, -1, PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        raise BpfError(f"perf_event_open uprobe {path}:{offset:#x} pid {pid}", ctypes.get_errno())
    try:
        if _ioctl(fd, PERF_EVENT_IOC_SET_BPF, ctypes.c_int(prog_fd)) < 0:
            raise BpfError("PERF_EVENT_IOC_SET_BPF", ctypes.get_errno())
        if _ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) < 0:
            raise BpfError("PERF_EVENT_IOC_ENABLE", ctypes.get_errno())
    except BpfError:
        os.close(fd)
        raise
    return fd


# How a uprobe is attached. A perf event on the uprobe PMU (every kernel since 4.17) or a
# uprobe_multi link (6.6+). Both fire for one process when given its pid (the kernel filters by mm),
# and closing the fd detaches; what differs is the cost of going away. The kernel waits for a
# grace period as each uprobe is removed, and a perf event does it under a global mutex, so
# closing them is serial whatever the caller does; links wait independently. Measured on this
# platform's 6.18, 20 uprobes of one process (benchmarks/README.md, "detach"):
#
# | attached as          | closed one by one | closed from 32 threads |
# |----------------------|-------------------|------------------------|
# | perf events          | 1.8-2.2 s         | 1.8 s                  |
# | uprobe_multi links   | 0.77-0.79 s       | 0.05-0.13 s            |
#
# So links are used where the kernel has them, and `close_concurrently` closes them.
_uprobe_multi: bool | None = None
_RETURN_0 = struct.pack("<BBhiBBhi", 0xB7, 0, 0, 0, 0x95, 0, 0, 0)   # r0 = 0; exit


def uprobe_multi_link(prog_fd: int, path: str, offsets: list[int], pid: int = -1) -> int:
    """A uprobe_multi link running `prog_fd` (loaded with BPF_TRACE_UPROBE_MULTI) at these file
    offsets of `path`, for process `pid` (every process: -1). Closing the returned fd detaches."""
    p = ctypes.create_string_buffer(path.encode())
    offs = (ctypes.c_uint64 * len(offsets))(*offsets)
    attr = _attr(struct.pack("<IIIIQQQQIII", prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0, ctypes.addressof(p),
                             ctypes.addressof(offs), 0, 0, len(offsets), 0, max(pid, 0)))
    fd = int(_syscall(SYS_BPF, BPF_LINK_CREATE, attr, len(attr)))
    if fd < 0:
        raise BpfError(f"uprobe_multi link {path}:{','.join(hex(o) for o in offsets)} pid {pid}", ctypes.get_errno())
    return fd


def uprobe_multi_supported() -> bool:
    """Whether this kernel makes uprobe_multi links: a link to a path that does not exist fails with
    ENOENT where it does (the path is looked up after the attach type is accepted), EINVAL where not."""
    global _uprobe_multi
    if _uprobe_multi is None and os.environ.get("OTELGO_UPROBE_LINKS") == "0":
        _uprobe_multi = False     # perf events, as on kernels before 6.6 (benchmarks compare the two)
    if _uprobe_multi is None:
        try:
            fd = prog_load(PROG_KPROBE, _RETURN_0, "GPL", "otelgo_um_probe", expected_attach_type=BPF_TRACE_UPROBE_MULTI)
        except BpfError:
            _uprobe_multi = False
        else:
            try:
                os.close(uprobe_multi_link(fd, "/nonexistent/otelgo-uprobe-multi-probe", [0]))
                _uprobe_multi = False     # cannot happen: the path does not exist
            except BpfError as e:
                _uprobe_multi = e.errno == errno.ENOENT
            finally:
                os.close(fd)
    return _uprobe_multi


def close_concurrently(fds: list[int]) -> None:
    """Close uprobe links (or perf events): from up to 32 threads, so that the kernel's waits
    overlap (the table above)."""
    if len(fds) <= 1:
        for fd in fds:
            os.close(fd)
        return
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(min(32, len(fds)), thread_name_prefix="otelgo-detach") as ex:
        list(ex.map(os.close, fds))


BPF_PROG_TEST_RUN = 10
PROG_XDP = 6


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> int:
    """Run a program once on `data` (BPF_PROG_TEST_RUN, for program types that support it); its
    return value."""
    buf = ctypes.create_string_buffer(data, len(data))
    attr = _attr(struct.pack("<IIIIQQII", prog_fd, 0, len(data), 0, ctypes.addressof(buf), 0, repeat, 0))
    _bpf(BPF_PROG_TEST_RUN, attr, "test run")
    return int(struct.unpack_from("<I", attr.raw, 4)[0])
