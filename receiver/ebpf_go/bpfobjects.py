"""A program image loaded into the kernel with bpfsys alone (no BCC, no LLVM): `BpfMap`, one map
read and written as raw bytes (pinned maps opened, or pinned, under the receiver's pin directory),
and `LoadedProgram`, the maps, functions (verified on first use) and uprobes of one image: what
the probe modules called on a BCC object (`attach_uprobe`, `uprobe_fds`, `bpf["map"]`).

A probe's program for one binary and its uprobes by pid: bpfprogram.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

from collector.errors import KernelError

from . import bpfsys
from .bpfcompile import MapImage, ProgramImage
from .ringbuf import RingBuffer


class BpfMap:
    """One map of a loaded program: raw bytes in and out. `Key`/`Leaf` may be set to ctypes
    types by whoever knows the C structs (then `tab[Key()] = Leaf()` works, as with BCC)."""

    def __init__(self, name: str, fd: int, spec: MapImage) -> None:
        self.name, self.fd, self.spec = name, fd, spec
        self.Key: Any = None
        self.Leaf: Any = None
        self._vsize = spec.value_size
        if spec.type in bpfsys.PERCPU_MAPS:
            self._vsize = ((spec.value_size + 7) & ~7) * bpfsys.possible_cpus()

    def lookup(self, key: bytes) -> bytes | None:
        return bpfsys.map_lookup(self.fd, key, self._vsize)

    def update(self, key: bytes, value: bytes, flags: int = bpfsys.BPF_ANY) -> None:
        bpfsys.map_update(self.fd, key, value, flags)

    def delete(self, key: bytes) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def keys(self) -> Iterator[bytes]:
        k: bytes | None = None
        while True:
            k = bpfsys.map_next_key(self.fd, k, self.spec.key_size)
            if k is None:
                return
            yield k

    def read_u64(self, index: int) -> int:
        """Entry `index` of an array of u64 (per-CPU values summed)."""
        raw = self.lookup(index.to_bytes(4, "little"))
        if raw is None:
            return 0
        step = (self.spec.value_size + 7) & ~7
        return sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), step))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(bytes(key), bytes(value))

    def __getitem__(self, key: Any) -> bytes:
        v = self.lookup(bytes(key))
        if v is None:
            raise KeyError(key)
        return v

    def __delitem__(self, key: Any) -> None:
        if not self.delete(bytes(key)):
            raise KeyError(key)


class LoadedProgram:
    """A program image loaded into the kernel: its maps (pinned ones under `pin_dir`), its
    functions (verified on first use) and its uprobes. Offers what the probe modules called on a
    BCC object: `attach_uprobe(name=, addr=, fn_name=, pid=)`, `uprobe_fds`."""

    def __init__(self, image: ProgramImage, pin_dir: str | None) -> None:
        self.image = image
        self.maps: dict[str, BpfMap] = {}
        self.prog_fds: dict[str, int] = {}
        self.uprobe_fds: dict[tuple[str, int, int, str], int] = {}
        # uprobe_multi links where the kernel has them (bpfsys: they detach far faster); decided once,
        # as a function loaded for links cannot be attached as a perf event and back
        self.uprobe_links = bpfsys.uprobe_multi_supported()
        self._ringbufs: dict[str, RingBuffer] = {}
        try:
            for m in image.maps:
                self.maps[m.name] = BpfMap(m.name, self._open_map(m, pin_dir), m)
        except BaseException:
            self.close()
            raise

    def _open_map(self, m: MapImage, pin_dir: str | None) -> int:
        spec = bpfsys.MapSpec(m.name, m.type, m.key_size, m.value_size, m.max_entries, m.flags)
        if m.pin is None:
            return bpfsys.map_create(spec)
        if not pin_dir:
            raise KernelError(f"{self.image.source}: map {m.name} is pinned but no pin directory is set")
        path = os.path.join(pin_dir, m.pin)
        for _ in range(2):
            try:
                fd = bpfsys.obj_get(path)
            except bpfsys.BpfError as e:
                if e.errno != errno.ENOENT:
                    raise
            else:
                got = bpfsys.map_info(fd)
                if (got.type, got.key_size, got.value_size) != (m.type, m.key_size, m.value_size):
                    os.close(fd)
                    raise KernelError(f"{path} is pinned with another layout (type {got.type}, key {got.key_size} "
                                      f"B, value {got.value_size} B) than {self.image.source} expects")
                return fd
            fd = bpfsys.map_create(spec)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                bpfsys.obj_pin(fd, path)
                return fd
            except bpfsys.BpfError as e:
                os.close(fd)
                if e.errno != errno.EEXIST:   # else pinned meanwhile by another program: use that one
                    raise
        raise KernelError(f"cannot open or pin {path}")

    def __getitem__(self, name: str | bytes) -> BpfMap:
        return self.maps[name.decode() if isinstance(name, bytes) else name]

    def load_func(self, name: str | bytes, prog_type: int = bpfsys.PROG_KPROBE) -> int:
        """The fd of function `name`, loaded (and verified) on first use."""
        fn = name.decode() if isinstance(name, bytes) else name
        fd = self.prog_fds.get(fn)
        if fd is not None:
            return fd
        code = self.image.functions.get(fn)
        if code is None:
            raise KernelError(f"{self.image.source}: no BPF function {fn}")
        insns = bytearray(code)
        for idx, map_name in self.image.relocations.get(fn, ()):
            bpfsys.patch_imm(insns, idx, self.maps[map_name].fd)
        eat = bpfsys.BPF_TRACE_UPROBE_MULTI if prog_type == bpfsys.PROG_KPROBE and self.uprobe_links else 0
        try:
            fd = bpfsys.prog_load(prog_type, bytes(insns), self.image.license, fn, expected_attach_type=eat)
        except bpfsys.BpfError as e:
            raise KernelError(f"{self.image.source}: {e.strerror} {e.what}") from None
        self.prog_fds[fn] = fd
        return fd

    def attach_uprobe(self, name: str | bytes, addr: int, fn_name: str | bytes, pid: int = -1,
                      sym_off: int = 0) -> int:
        """Attach `fn_name` at the ELF virtual address `addr` (+ sym_off) of file `name`."""
        path = name.decode() if isinstance(name, bytes) else name
        fn = fn_name.decode() if isinstance(fn_name, bytes) else fn_name
        prog_fd = self.load_func(fn)
        offset = bpfsys.vaddr_to_offset(path, addr + sym_off)
        key = (path, offset, pid, fn)
        if key in self.uprobe_fds:
            raise KernelError(f"uprobe {fn} at {path}:{offset:#x} is already attached for pid {pid}")
        if self.uprobe_links:
            self.uprobe_fds[key] = bpfsys.uprobe_multi_link(prog_fd, path, [offset], pid)
        else:
            self.uprobe_fds[key] = bpfsys.attach_uprobe(prog_fd, path, offset, pid)
        return self.uprobe_fds[key]

    def take_uprobes(self, keys: list[tuple[str, int, int, str]] | None = None) -> list[int]:
        """Forget these uprobes (all: None) and return their fds, for the caller to close: closing
        detaches, and `bpfsys.close_concurrently` closes many at the cost of about one."""
        picked = list(self.uprobe_fds) if keys is None else keys
        return [fd for fd in (self.uprobe_fds.pop(k, None) for k in picked) if fd is not None]

    def detach(self, key: tuple[str, int, int, str]) -> None:
        bpfsys.close_concurrently(self.take_uprobes([key]))

    def ring_buffer(self, name: str) -> RingBuffer:
        rb = self._ringbufs.get(name)
        if rb is None:
            m = self.maps[name]
            if m.spec.type != bpfsys.MAP_RINGBUF:
                raise KernelError(f"{self.image.source}: map {name} is not a ring buffer")
            rb = self._ringbufs[name] = RingBuffer(m.fd, m.spec.max_entries)
        return rb

    def close(self) -> None:
        bpfsys.close_concurrently(self.take_uprobes())
        for rb in self._ringbufs.values():
            rb.close()
        self._ringbufs.clear()
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()
        for m in self.maps.values():
            os.close(m.fd)
        self.maps.clear()
