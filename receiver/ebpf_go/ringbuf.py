"""BPF ring buffer reader over mmap, without BCC and without a ctypes callback per record.

Layout (kernel/bpf/ringbuf.c): the consumer page (consumer_pos, u64 at offset 0) is mapped
read-write at offset 0 of the map fd; the producer page (producer_pos at offset 0) followed by the
data area mapped twice in a row (so a record that wraps is contiguous) is mapped read-only at
offset PAGE_SIZE. Each record: u32 length with BUSY (bit 31, being written) and DISCARD (bit 30)
flags, u32 page offset, then the data, padded to 8 bytes.

`read()` returns the records committed so far as a list of bytes and advances consumer_pos once
for the whole batch. `read_unpacked(layout)` decodes fixed-layout records in place, one
`struct.unpack_from` per record and no intermediate copy. One thread reads a given ring buffer.
"""

from __future__ import annotations

import mmap
import select
import struct
from typing import Any

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8
PAGE = mmap.PAGESIZE

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    """Reader of one BPF_MAP_TYPE_RINGBUF map; `size` is its max_entries (data bytes, a power of two)."""

    def __init__(self, map_fd: int, size: int) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring buffer size {size} is not a power of two")
        self.fd = map_fd
        self.size = size
        self.mask = size - 1
        self._cons = mmap.mmap(map_fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        self._pos = _U64.unpack_from(self._cons, 0)[0]
        self._ep: select.epoll | None = None

    def pending(self) -> int:
        """Bytes (headers included) between the consumer and the producer."""
        return int(_U64.unpack_from(self._prod, 0)[0] - self._pos)

    def read(self, limit: int = 1 << 30) -> list[bytes]:
        """Committed records (at most `limit`), oldest first; stops at the first still being written."""
        prod_mm = self._prod
        prod = _U64.unpack_from(prod_mm, 0)[0]
        pos = self._pos
        if pos >= prod:
            return []
        out: list[bytes] = []
        append = out.append
        mask, u32 = self.mask, _U32.unpack_from
        while pos < prod and len(out) < limit:
            off = (pos & mask) + PAGE
            hdr = u32(prod_mm, off)[0]
            if hdr & BUSY:
                break
            n = hdr & 0x3FFFFFFF
            if not hdr & DISCARD:
                start = off + HDR
                append(prod_mm[start:start + n])
            pos += (n + HDR + 7) & ~7
        self._commit(pos)
        return out

    def read_unpacked(self, layout: struct.Struct, limit: int = 1 << 30) -> tuple[list[tuple[Any, ...]], int]:
        """(records decoded with `layout`, number of records shorter than layout.size, skipped)."""
        prod_mm = self._prod
        prod = _U64.unpack_from(prod_mm, 0)[0]
        pos = self._pos
        if pos >= prod:
            return [], 0
        out: list[tuple[Any, ...]] = []
        append = out.append
        unpack, need = layout.unpack_from, layout.size
        mask, u32 = self.mask, _U32.unpack_from
        short = 0
        while pos < prod and len(out) < limit:
            off = (pos & mask) + PAGE
            hdr = u32(prod_mm, off)[0]
            if hdr & BUSY:
                break
            n = hdr & 0x3FFFFFFF
            if not hdr & DISCARD:
                if n >= need:
                    append(unpack(prod_mm, off + HDR))
                else:
                    short += 1
            pos += (n + HDR + 7) & ~7
        self._commit(pos)
        return out, short

    def _commit(self, pos: int) -> None:
        if pos != self._pos:
            self._pos = pos
            _U64.pack_into(self._cons, 0, pos)

    def wait(self, timeout: float) -> bool:
        """Block until the kernel signals data (a record submitted with a wakeup) or `timeout` s."""
        if self._ep is None:
            self._ep = select.epoll()
            self._ep.register(self.fd, select.EPOLLIN)
        return bool(self._ep.poll(timeout))

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        for m in (self._cons, self._prod):
            try:
                m.close()
            except BufferError:  # a memoryview still refers to it: freed when that goes
                pass
