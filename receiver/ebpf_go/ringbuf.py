"""BPF ring buffer reader over mmap, without BCC and without a ctypes callback per record.

Layout (kernel/bpf/ringbuf.c): the consumer page (consumer_pos, u64 at offset 0) is mapped
read-write at offset 0 of the map fd; the producer page (producer_pos at offset 0) followed by the
data area mapped twice in a row (so a record that wraps is contiguous) is mapped read-only at
offset PAGE_SIZE. Each record: u32 length with BUSY (bit 31, being written) and DISCARD (bit 30)
flags, u32 page offset, then the data, padded to 8 bytes.

`read()` returns the records committed so far as a list of bytes and advances consumer_pos once
for the whole batch.

consumer_pos and producer_pos are read and written through a `memoryview.cast("Q")`: one aligned
8-byte load or store. `struct.pack_into` must not be used for consumer_pos: it zero-fills the field
before writing it (CPython's `s_pack_internal`), and a BPF `bpf_ringbuf_reserve` that reads
consumer_pos = 0 in between sees `new_prod_pos - cons_pos > mask` and fails: a record lost with the
ring nearly empty (measured: one or two per second at 20-50k records/s, each at a commit).
Headers are read with one 4-byte load the same way (`"<I"` unpacks byte by byte). `read_unpacked(layout)` decodes fixed-layout records in place, one
`struct.unpack_from` per record and no intermediate copy. One thread at a time reads a given ring buffer.

`read_block()` copies the committed records as one bytes object (headers included) and releases
their space; `unpack_block` / `split_block` decode such a block later, as `read_unpacked` / `read`.

`RingCopier`: a thread that copies records out of ring buffers into a bounded `RecordQueue` per ring
every 10 ms, so that ring space is released at once however long the thread that turns records into
spans is busy; that thread takes from the queue (`RingCopier.take`). The receiver's copier copies
blocks (`read_block`): its queue holds bytes, which the garbage collector neither tracks nor walks,
and the decode runs on the consuming thread just before the records become spans.
"""

from __future__ import annotations

import collections
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8
PAGE = mmap.PAGESIZE



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
        # single loads/stores (see the module docstring): consumer_pos, producer_pos, the u32 headers
        self._cons_q = memoryview(self._cons).cast("Q")
        self._prod_q = memoryview(self._prod).cast("Q")
        self._words = memoryview(self._prod).cast("I")
        self._pos = int(self._cons_q[0])
        self._ep: select.epoll | None = None

    @property
    def position(self) -> int:
        """Bytes read since the map was created (consumer_pos): how much ring space reads released."""
        return self._pos

    def pending(self) -> int:
        """Bytes (headers included) between the consumer and the producer."""
        return int(self._prod_q[0] - self._pos)

    def read(self, limit: int = 1 << 30) -> list[bytes]:
        """Committed records (at most `limit`), oldest first; stops at the first still being written."""
        prod_mm = self._prod
        prod = self._prod_q[0]
        pos = self._pos
        if pos >= prod:
            return []
        out: list[bytes] = []
        append = out.append
        mask, words = self.mask, self._words
        while pos < prod and len(out) < limit:
            off = (pos & mask) + PAGE
            hdr = words[off >> 2]
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
        prod = self._prod_q[0]
        pos = self._pos
        if pos >= prod:
            return [], 0
        out: list[tuple[Any, ...]] = []
        append = out.append
        unpack, need = layout.unpack_from, layout.size
        mask, words = self.mask, self._words
        short = 0
        while pos < prod and len(out) < limit:
            off = (pos & mask) + PAGE
            hdr = words[off >> 2]
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

    def read_block(self) -> list[bytes]:
        """The committed records as one copy of the ring's bytes, headers included (oldest first,
        up to the first still being written): [] or [block], one object however many records (the
        garbage collector does not track bytes), decoded later by `unpack_block` or `split_block`."""
        prod = self._prod_q[0]
        pos = start = self._pos
        if pos >= prod:
            return []
        mask, words = self.mask, self._words
        while pos < prod:
            hdr = words[((pos & mask) + PAGE) >> 2]
            if hdr & BUSY:
                break
            pos += ((hdr & 0x3FFFFFFF) + HDR + 7) & ~7
        if pos == start:
            return []
        off = (start & mask) + PAGE
        block = self._prod[off:off + pos - start]   # contiguous: the data area is mapped twice in a row
        self._commit(pos)
        return [block]

    def _commit(self, pos: int) -> None:
        if pos != self._pos:
            self._pos = pos
            self._cons_q[0] = pos   # one 8-byte store: never a partial (or zeroed) consumer_pos

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
        for v in (self._cons_q, self._prod_q, self._words):
            v.release()
        for m in (self._cons, self._prod):
            try:
                m.close()
            except BufferError:  # a memoryview still refers to it: freed when that goes
                pass


def unpack_block(block: bytes, layout: struct.Struct) -> tuple[list[tuple[Any, ...]], int]:
    """`RingBuffer.read_block`'s records decoded with `layout`: as `read_unpacked`."""
    out: list[tuple[Any, ...]] = []
    if not block:
        return out, 0
    append = out.append
    unpack, need = layout.unpack_from, layout.size
    words = memoryview(block).cast("I")
    pos, end, short = 0, len(block), 0
    while pos < end:
        hdr = words[pos >> 2]
        n = hdr & 0x3FFFFFFF
        if not hdr & DISCARD:
            if n >= need:
                append(unpack(block, pos + HDR))
            else:
                short += 1
        pos += (n + HDR + 7) & ~7
    words.release()
    return out, short


def split_block(block: bytes) -> list[bytes]:
    """`RingBuffer.read_block`'s records, each as bytes: as `read`."""
    out: list[bytes] = []
    if not block:
        return out
    words = memoryview(block).cast("I")
    pos, end = 0, len(block)
    while pos < end:
        hdr = words[pos >> 2]
        n = hdr & 0x3FFFFFFF
        if not hdr & DISCARD:
            out.append(block[pos + HDR:pos + HDR + n])
        pos += (n + HDR + 7) & ~7
    words.release()
    return out


def wait_any(rings: Iterable[RingBuffer], timeout: float) -> bool:
    """Block until one of `rings` has data or `timeout` s passed (True: data). The kernel's poll is
    level-triggered on available data: a record already there returns at once; one submitted while
    we sleep wakes us only if submitted with a wakeup (BPF_RB_FORCE_WAKEUP, or the default when the
    consumer has caught up). A fresh epoll per call: rings come and go between calls."""
    with select.epoll() as ep:
        for r in rings:
            ep.register(r.fd, select.EPOLLIN)
        return bool(ep.poll(timeout))


class RecordQueue:
    """Records copied out of one ring buffer, oldest first, until the consumer takes them: whatever
    `take` returns, e.g. decoded records or `read_block`'s blocks (a "record" below is one such item).

    Bounded by the ring bytes its records took (headers included): once `max_bytes` are held the
    copier leaves the ring alone, the ring fills and the BPF program counts the records it cannot
    reserve (its `lost` map). Nothing is dropped here and nothing grows without bound: at most
    `max_bytes` plus one ring-full (the last copy) are held."""

    __slots__ = ("ring", "take", "max_bytes", "chunks", "bytes", "records")

    def __init__(self, ring: RingBuffer, take: Callable[[], list[Any]], max_bytes: int) -> None:
        self.ring = ring
        self.take = take            # reads the ring: e.g. a probe collector's take()
        self.max_bytes = max_bytes
        self.chunks: collections.deque[tuple[list[Any], int]] = collections.deque()  # (records, ring bytes)
        self.bytes = 0              # ring bytes of the records held
        self.records = 0            # records held

    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def copy(self) -> int:
        """Copy what the ring holds now, unless full; returns the records copied."""
        if self.bytes >= self.max_bytes:
            return 0
        before = self.ring.position
        records = self.take()
        if records:
            nbytes = self.ring.position - before
            self.chunks.append((records, nbytes))
            self.records += len(records)
            self.bytes += nbytes
        return len(records)

    def pop(self, max_bytes: int | None = None) -> list[Any]:
        """The records held, oldest first, whole copies until `max_bytes` of ring bytes are taken
        (None: all); once none are left held, those in the ring now too."""
        chunks = self.chunks
        out: list[Any] = []
        taken = 0
        while chunks and (max_bytes is None or taken < max_bytes):
            records, nbytes = chunks.popleft()
            if out:
                out.extend(records)
            else:
                out = records
            taken += nbytes
            self.records -= len(records)
            self.bytes -= nbytes
        if not chunks:
            out.extend(self.take())
        return out


class RingCopier:
    """Copies records out of ring buffers into their `RecordQueue` every `period` s, counted from the
    start of the previous pass, on its own thread, so that ring space is released every ~period
    however long the consumer is busy (a batch merged and encoded, a garbage collection): a pass only
    needs the GIL for ~1 ms (the switch interval gives it within 5 ms). After a pass that copied
    nothing it sleeps on the rings' epoll, up to `idle_wait`: the BPF programs submit every 32nd
    record per CPU with BPF_RB_FORCE_WAKEUP, so a burst wakes it after a few records and an idle
    copier wakes 1/idle_wait times a second.

    One lock covers the queues and every read of a ring: `add`, `remove`, `take` and a copier pass
    exclude each other, so once `remove(ring)` has returned the ring is never read again (its map may
    be closed and unmapped). `ready` is set after a pass that copied records."""

    def __init__(self, period: float = 0.01, idle_wait: float = 0.1,
                 on_error: Callable[[BaseException], None] | None = None, max_total_bytes: int | None = None) -> None:
        self.period = period
        self.idle_wait = idle_wait
        # All queues together hold at most ~this many ring bytes (None: only each queue's own bound):
        # under overload many traced binaries would otherwise hold their per-ring bound each.
        self.max_total_bytes = max_total_bytes
        self._first = 0              # where the last pass started (see copy_pass)
        self.on_error = on_error     # an exception out of a pass (our bug); the copier goes on
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._queues: dict[RingBuffer, RecordQueue] = {}
        self._stop = threading.Event()
        self._ep: select.epoll | None = None
        self._wake = -1              # eventfd in the epoll: stop() interrupts the idle wait
        self._thread: threading.Thread | None = None

    def add(self, ring: RingBuffer, take: Callable[[], list[Any]], max_bytes: int) -> None:
        """Copy `ring` from now on with `take`, holding at most ~`max_bytes` of its records."""
        with self._lock:
            self._queues[ring] = RecordQueue(ring, take, max_bytes)
            self._watch(ring)

    def _watch(self, ring: RingBuffer) -> None:
        if self._ep is None:
            return
        try:
            self._ep.register(ring.fd, select.EPOLLIN)
        except PermissionError:  # not pollable (a memfd in tests): the next timed pass finds its data
            pass

    def remove(self, ring: RingBuffer) -> list[Any]:
        """Stop copying `ring`; returns the records still held and those in the ring now (none are
        lost at a close). Once this returns, nothing here reads the ring again."""
        with self._lock:
            q = self._queues.pop(ring, None)
            if q is None:
                return []
            if self._ep is not None:
                try:
                    self._ep.unregister(ring.fd)
                except OSError:  # never registered (not pollable)
                    pass
            return q.pop()

    def take(self, ring: RingBuffer, max_bytes: int | None = None) -> list[Any]:
        """The records copied from `ring` so far, then those in it now: oldest first (none if removed).
        `max_bytes`: stop after the copies that hold this many ring bytes; the ring is read only
        when no copy is left (a consumer behind takes its backlog in steps of about that size)."""
        with self._lock:
            q = self._queues.get(ring)
            return q.pop(max_bytes) if q is not None else []

    def held(self, ring: RingBuffer) -> tuple[int, int]:
        """(records, ring bytes) held for `ring`."""
        with self._lock:
            q = self._queues.get(ring)
            return (q.records, q.bytes) if q is not None else (0, 0)

    def copy_pass(self) -> tuple[int, bool]:
        """Copy every ring whose queue has room once, while all of them together have room too:
        (records copied, some queue or the total was full)."""
        n, full = 0, False
        with self._lock:
            limit = self.max_total_bytes
            queues = list(self._queues.values())
            if limit is not None and queues:
                # Each pass starts at the next ring: when the total bound stops a pass, no ring is
                # always the one left behind.
                self._first = (self._first + 1) % len(queues)
                queues = queues[self._first:] + queues[:self._first]
            total = sum(q.bytes for q in queues) if limit is not None else 0
            for q in queues:
                if q.full() or (limit is not None and total >= limit):
                    full = True
                    continue
                try:
                    before = q.bytes
                    n += q.copy()
                    total += q.bytes - before
                except Exception as e:  # our bug (a decode in take): report it, copy the other rings
                    if self.on_error is None:
                        raise
                    self.on_error(e)
        if n:
            self.ready.set()
        return n, full

    def start(self, name: str = "ring-copier") -> None:
        self._stop.clear()
        with self._lock:
            self._ep = select.epoll()
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._ep.register(self._wake, select.EPOLLIN)
            for ring in self._queues:
                self._watch(ring)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._ep is not None
        ep = self._ep
        woke = False   # the last idle wait ended on data; if the pass then found none (a record still
        # being written: poll is level-triggered), wait one period rather than spin
        while not self._stop.is_set():
            started = time.monotonic()
            n, full = self.copy_pass()
            if n == 0 and not full and not woke:
                woke = bool(ep.poll(self.idle_wait))
            else:
                woke = False
                self._stop.wait(max(0.0, started + self.period - time.monotonic()))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (records copied stay queued for `take`), then close its epoll."""
        self._stop.set()
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.ready.set()   # a consumer waiting for data sees the stop
        with self._lock:
            if self._ep is not None:
                self._ep.close()
                self._ep = None
            if self._wake >= 0:
                os.close(self._wake)
                self._wake = -1
