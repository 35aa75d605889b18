"""The ring copier (receiver/ebpf_go/ringbuf.py: RingCopier, RecordQueue) and the receiver's use of it:
records leave the ring buffer into a bounded queue, in order; a full queue leaves the ring alone (the
BPF side then counts the loss); a ring removed is never read again; shutdown pushes every record,
copied or still in the ring.

The ring buffer is the memfd imitation of test_ringbuf.py (no root), read by the real RingBuffer.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from collector.component import ComponentID
from collector.spans import KIND_SERVER, Span, SpanBatch
from collector.telemetry import ComponentTelemetry, SelfMetrics
from receiver.ebpf_go import bpfsys
from receiver.ebpf_go.bpfprogram import Program
from receiver.ebpf_go.config import EbpfGoConfig
from receiver.ebpf_go.probes import Probe, RawCollector, StructCollector
from receiver.ebpf_go.receiver import EbpfGoReceiver
from receiver.ebpf_go.ringbuf import BUSY, DISCARD, RingBuffer, RingCopier, split_block, unpack_block
from receiver.ebpf_go.traced import ProbeProgram, TracedBinary

from .test_ringbuf import IS_ROOT, FakeRing, _ringbuf_output_prog

SIZE = 4096
REC = struct.Struct("<Q24x")     # a sequence number; 32 bytes, 40 in the ring with its header
IN_RING = 40


@pytest.fixture
def ring() -> Iterator[tuple[FakeRing, RingBuffer]]:
    f = FakeRing(SIZE)
    r = RingBuffer(f.fd, SIZE)
    yield f, r
    r.close()
    f.close()


def put(f: FakeRing, first: int, n: int) -> int:
    for i in range(first, first + n):
        f.put(REC.pack(i))
    return first + n


def seqs(records: list[Any]) -> list[int]:
    return [r[0] for r in records]


def test_copies_in_order_and_frees_the_ring(ring: tuple[FakeRing, RingBuffer]) -> None:
    f, r = ring
    c = RingCopier()
    c.add(r, lambda: r.read_unpacked(REC)[0], max_bytes=10 * SIZE)
    nxt = 0
    for _ in range(10):              # 10 ring-fulls in all, never more than 80 at once in the ring
        nxt = put(f, nxt, 80)
        assert c.copy_pass() == (80, False)
        assert r.pending() == 0 and f.cons() == f.prod   # ring space released at once
    assert c.ready.is_set()
    assert c.held(r) == (800, 800 * IN_RING)
    nxt = put(f, nxt, 5)             # still in the ring: comes after the copied ones
    assert seqs(c.take(r)) == list(range(805))
    assert c.held(r) == (0, 0) and c.take(r) == []


def test_blocks_hold_the_records_the_readers_return(ring: tuple[FakeRing, RingBuffer]) -> None:
    """read_block copies the committed records as bytes (what the receiver's copier queues); decoded
    by unpack_block / split_block they are what read_unpacked / read return: across the ring's wrap,
    without discarded records, short ones counted, up to the first record still being written."""
    f, r = ring
    f2 = FakeRing(SIZE)
    r2 = RingBuffer(f2.fd, SIZE)
    try:
        nxt = 0
        for _ in range(30):                      # 30 x 60 records through a ring of ~100: it wraps
            for fk in (f, f2):
                put(fk, nxt, 60)
                fk.put(b"short")                 # shorter than REC: skipped, counted
                fk.put(REC.pack(10**9), flags=DISCARD)
            nxt += 60
            blocks = r.read_block()
            assert len(blocks) == 1 and all(type(b) is bytes for b in blocks)
            assert f.cons() == f.prod and r.read_block() == []   # ring space released
            assert unpack_block(blocks[0], REC) == r2.read_unpacked(REC) == ([REC.unpack(REC.pack(i))
                                                                          for i in range(nxt - 60, nxt)], 1)
        put(f, 0, 3)
        f.set_header(f.prod - IN_RING, BUSY | REC.size)   # the last one still being written
        assert seqs(unpack_block(r.read_block()[0], REC)[0]) == [0, 1]
        assert r.read_block() == []
        f.set_header(f.prod - IN_RING, REC.size)           # committed now
        assert split_block(r.read_block()[0]) == [REC.pack(2)]
    finally:
        r2.close()
        f2.close()


def test_collector_decodes_blocks_as_it_reads_the_ring(ring: tuple[FakeRing, RingBuffer]) -> None:
    f, r = ring
    put(f, 0, 5)
    f.put(b"x")
    blocks = r.read_block()
    col = StructCollector(REC)
    assert seqs(col.decode(blocks)) == list(range(5)) and col.short == 1
    assert RawCollector().decode(blocks) == [REC.pack(i) for i in range(5)] + [b"x"]
    assert col.decode([]) == []


def test_a_full_queue_leaves_records_in_the_ring(ring: tuple[FakeRing, RingBuffer]) -> None:
    f, r = ring
    c = RingCopier()
    c.add(r, lambda: r.read_unpacked(REC)[0], max_bytes=2 * SIZE)
    nxt = 0
    while c.held(r)[1] < 2 * SIZE:
        nxt = put(f, nxt, 50)
        assert c.copy_pass()[0] == 50
    held = c.held(r)
    nxt = put(f, nxt, 50)
    assert c.copy_pass() == (0, True)            # full: the ring keeps them (and fills: BPF counts)
    assert c.held(r) == held and r.pending() == 50 * IN_RING
    assert held[1] < 2 * SIZE + SIZE             # bounded: the limit plus at most one ring-full
    assert seqs(c.take(r)) == list(range(nxt))   # nothing lost, in order, the ring's after the queue's
    nxt = put(f, nxt, 10)
    assert c.copy_pass() == (10, False)          # room again
    assert seqs(c.take(r)) == list(range(nxt - 10, nxt))


def test_a_backlog_is_taken_in_steps(ring: tuple[FakeRing, RingBuffer]) -> None:
    """take(max_bytes): whole copies until that many ring bytes; the ring only once the queue is empty."""
    f, r = ring
    c = RingCopier()
    c.add(r, lambda: r.read_unpacked(REC)[0], max_bytes=10 * SIZE)
    nxt = 0
    for _ in range(4):
        nxt = put(f, nxt, 50)
        c.copy_pass()
    nxt = put(f, nxt, 5)                          # in the ring, after 4 copies of 50
    assert seqs(c.take(r, 100 * IN_RING)) == list(range(100))
    assert c.held(r) == (100, 100 * IN_RING) and r.pending() == 5 * IN_RING
    assert seqs(c.take(r, 1)) == list(range(100, 150))          # at least one copy
    assert seqs(c.take(r, 100 * IN_RING)) == list(range(150, 205))  # the last copy, then the ring
    assert c.held(r) == (0, 0) and r.pending() == 0


def test_thread_copies_while_the_consumer_takes(ring: tuple[FakeRing, RingBuffer]) -> None:
    """Producer, copier thread and consumer at once: every record once, in order."""
    f, r = ring
    c = RingCopier(period=0.001, idle_wait=0.005)
    c.add(r, lambda: r.read_unpacked(REC)[0], max_bytes=100 * SIZE)   # room for 1000 records and more
    c.start()
    got: list[int] = []
    nxt = 0
    deadline = time.monotonic() + 60
    try:
        while nxt < 20000:
            assert time.monotonic() < deadline, f"ring not freed by the copier: {nxt} records put"
            if f.prod - f.cons() + 10 * IN_RING <= SIZE:
                nxt = put(f, nxt, 10)
            else:
                time.sleep(0.0005)       # ring full: the copier (not the consumer) must free it
            if nxt % 1000 == 0:
                got += seqs(c.take(r))
    finally:
        c.stop()
    got += seqs(c.take(r))
    assert got == list(range(20000))


def test_stop_keeps_what_was_copied_for_the_last_take(ring: tuple[FakeRing, RingBuffer]) -> None:
    f, r = ring
    c = RingCopier(period=0.001)
    c.add(r, lambda: r.read_unpacked(REC)[0], max_bytes=4 * SIZE)
    c.start()
    put(f, 0, 60)
    deadline = time.monotonic() + 10
    while c.held(r)[0] < 60 and time.monotonic() < deadline:
        time.sleep(0.001)
    c.stop()
    put(f, 60, 30)                    # produced after the copier stopped: still in the ring
    assert seqs(c.take(r)) == list(range(90))


def test_a_removed_ring_is_never_read_again(ring: tuple[FakeRing, RingBuffer]) -> None:
    """remove() waits for a pass in progress: once it returns, the ring may be unmapped."""
    f, r = ring
    closed = threading.Event()
    after_close: list[float] = []
    in_take = threading.Event()

    def slow_take() -> list[Any]:
        if closed.is_set():
            after_close.append(time.monotonic())
            return []
        in_take.set()
        time.sleep(0.02)              # widen the window in which remove() is called
        return r.read_unpacked(REC)[0]

    f2 = FakeRing(SIZE)
    r2 = RingBuffer(f2.fd, SIZE)
    c = RingCopier(period=0.001)
    c.add(r, slow_take, max_bytes=4 * SIZE)
    c.add(r2, lambda: r2.read_unpacked(REC)[0], max_bytes=4 * SIZE)
    put(f, 0, 20)
    c.start()
    try:
        assert in_take.wait(10)
        left = c.remove(r)            # a pass is inside slow_take now: remove waits for it
        closed.set()
        r.close()                     # as close_programs does
        assert seqs(left) == list(range(20))
        put(f2, 0, 7)                 # the other ring is still copied
        deadline = time.monotonic() + 10
        while c.held(r2)[0] < 7 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert c.held(r2)[0] == 7
        assert c.remove(r) == [] and c.take(r) == []
    finally:
        c.stop()
        r2.close()
        f2.close()
    assert after_close == []


def test_a_failing_read_is_reported_and_the_other_rings_copied(ring: tuple[FakeRing, RingBuffer]) -> None:
    f, r = ring
    errors: list[BaseException] = []
    c = RingCopier(on_error=errors.append)

    class Broken:
        fd, position = -1, 0

    def fail() -> list[Any]:
        raise ValueError("bad record")
    c.add(Broken(), fail, max_bytes=SIZE)  # type: ignore[arg-type]
    c.add(r, lambda: r.read_unpacked(REC)[0], max_bytes=SIZE)
    put(f, 0, 3)
    assert c.copy_pass() == (3, False)
    assert [str(e) for e in errors] == ["bad record"]


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root")
def test_idle_copier_is_woken_by_a_real_ring_buffer() -> None:
    """Idle, the copier sleeps on the rings' epoll: a record (submitted with the default wake-up)
    wakes it long before its idle_wait of a minute; a ring removed leaves the epoll."""
    size = 4096
    fd = bpfsys.map_create(bpfsys.MapSpec("rbcopy", bpfsys.MAP_RINGBUF, 0, 0, size))
    buf = bpfsys.map_create(bpfsys.MapSpec("rbcopy_buf", bpfsys.MAP_ARRAY, 4, 1024, 1))
    prog = _ringbuf_output_prog(fd, buf, 64)
    rb = RingBuffer(fd, size)
    c = RingCopier(period=0.001, idle_wait=60)
    c.add(rb, rb.read, max_bytes=4 * size)
    c.start()
    try:
        time.sleep(0.05)                  # let it reach its idle wait
        c.ready.clear()
        assert bpfsys.prog_test_run(prog, bytes(range(64))) == 2
        assert c.ready.wait(30)           # not the 60 s idle_wait: the epoll woke it
        assert c.take(rb) == [bytes(range(64))]
        assert c.remove(rb) == []
    finally:
        c.stop()
        rb.close()
        for f in (prog, fd, buf):
            os.close(f)


# ---------------------------------------------------------------- the receiver around it


class SeqProbe(Probe):
    """A probe whose records are REC: one SERVER span per record, named by its sequence number."""

    name = "seq"
    scope = "seq"

    def collector(self) -> StructCollector:
        return StructCollector(REC)

    def spans(self, records: list[Any], state: Any, gb: Any, mono_to_unix: int,
              common: Any) -> list[tuple[int, Span]]:
        return [(42, Span(b"\1" * 16, b"\2" * 8, str(r[0]), kind=KIND_SERVER)) for r in records]


class FakeBpf:
    """What the receiver uses of a loaded program: the `lost` map, and close()."""

    def __init__(self, ring: RingBuffer) -> None:
        self.ring = ring
        self.closed = False

    def __getitem__(self, name: str) -> Any:
        class Lost:
            @staticmethod
            def read_u64(index: int) -> int:
                return 0
        return Lost()

    def take_uprobes(self, keys: Any = None) -> list[int]:
        return []

    def close(self) -> None:
        self.closed = True
        self.ring.close()


class Spans:
    def __init__(self) -> None:
        self.names: list[str] = []

    def consume(self, batch: SpanBatch) -> None:
        self.names += [s.name for rs in batch.resource_spans for ss in rs.scope_spans for s in ss.spans]


def receiver_with(r: RingBuffer) -> tuple[EbpfGoReceiver, TracedBinary, Spans]:
    out = Spans()
    rcv = EbpfGoReceiver(ComponentID("ebpf_go"), EbpfGoConfig(), ComponentTelemetry("receiver", "ebpf_go",
                                                                                    SelfMetrics()), out)
    probe = SeqProbe()
    col = probe.collector()
    col.bind(r)
    pp = ProbeProgram(probe, Program(FakeBpf(r), "seq.c", 0.0), col, None,  # type: ignore[arg-type]
                      rcv.common)
    tb = TracedBinary((1, 2), None, "/bin/seq", [pp])  # type: ignore[arg-type]
    rcv.binaries[tb.key] = tb
    rcv.drain.copier.add(r, r.read_block, 4 * SIZE)   # as ProcessTracker._binary_for does (SpanDrain.add_rings)
    return rcv, tb, out


def test_receiver_shutdown_pushes_copied_and_ring_records(ring: tuple[FakeRing, RingBuffer]) -> None:
    f, r = ring
    rcv, tb, out = receiver_with(r)
    rcv.drain.copier.start()
    put(f, 0, 50)
    deadline = time.monotonic() + 10
    while rcv.drain.copier.held(r)[1] < 50 * IN_RING and time.monotonic() < deadline:
        time.sleep(0.001)
    put(f, 50, 25)                    # not copied yet
    bpf = tb.programs[0].program.bpf
    rcv.shutdown()
    assert out.names == [str(i) for i in range(75)]
    assert bpf.closed and rcv.binaries == {}     # type: ignore[attr-defined]
    assert rcv.telemetry.metrics.registry.get_sample_value("otelgo_ebpf_events_total") == 75


def test_receiver_drain_then_release_loses_nothing(ring: tuple[FakeRing, RingBuffer]) -> None:
    """A binary released (program_linger over): what the copier copied after the last drain is pushed
    before its ring is unmapped, and the copier no longer knows the ring."""
    f, r = ring
    rcv, tb, out = receiver_with(r)
    put(f, 0, 10)
    assert rcv.drain.copier.copy_pass() == (1, False)     # one block of 10 records
    with rcv._lock:
        assert rcv.drain.drain_binary(tb) == 10
    put(f, 10, 5)
    assert rcv.drain.copier.copy_pass() == (1, False)
    put(f, 15, 5)
    tb.idle_since = time.monotonic() - 1e6
    rcv.tracker.close_idle()
    assert out.names == [str(i) for i in range(20)]
    assert rcv.drain.copier.take(r) == [] and rcv.drain.copier.copy_pass() == (0, False)
    rcv.shutdown()


def test_the_total_bound_holds_across_rings_and_turns(ring: tuple[FakeRing, RingBuffer]) -> None:
    # Three rings, each allowed 4 ring-fulls, all together 2: under overload the queues never hold
    # much more than the total (plus one copy), every ring gets its turn, and nothing is lost.
    f, r = ring
    others = [FakeRing(SIZE) for _ in range(2)]
    fakes = [f, *others]
    rings = [r, *(RingBuffer(o.fd, SIZE) for o in others)]
    try:
        c = RingCopier(max_total_bytes=2 * SIZE)
        for rb in rings:
            c.add(rb, lambda rb=rb: rb.read_unpacked(REC)[0], max_bytes=4 * SIZE)
        nxt = [0, 0, 0]
        copied_from: set[int] = set()
        for _ in range(12):
            for i, fk in enumerate(fakes):
                if rings[i].pending() == 0:
                    nxt[i] = put(fk, nxt[i], 60)   # each ring refilled once emptied: a steady overload
            before = [c.held(rb)[0] for rb in rings]
            c.copy_pass()
            copied_from |= {i for i, rb in enumerate(rings) if c.held(rb)[0] > before[i]}
            assert sum(c.held(rb)[1] for rb in rings) < 2 * SIZE + 60 * IN_RING
        assert copied_from == {0, 1, 2}            # no ring always left behind
        n, full = c.copy_pass()
        assert (n, full) == (0, True)              # total reached: the rings keep their records
        for i, rb in enumerate(rings):
            assert seqs(c.take(rb)) == list(range(nxt[i]))   # nothing lost, in order
        assert c.copy_pass() == (0, False)
    finally:
        for rb in rings[1:]:
            rb.close()
        for o in others:
            o.close()


def test_a_blocked_pipeline_does_not_hold_the_receiver_lock(ring: tuple[FakeRing, RingBuffer]) -> None:
    """The drain decodes under the lock and pushes after it: while the next consumer blocks (a full
    batch processor), discovery can still take the lock to attach or release programs."""
    f, r = ring
    rcv, tb, out = receiver_with(r)
    release = threading.Event()
    entered = threading.Event()
    real_consume = out.consume

    def blocking(batch: SpanBatch) -> None:
        entered.set()
        release.wait(10)
        real_consume(batch)

    out.consume = blocking  # type: ignore[method-assign]
    put(f, 0, 10)
    assert rcv.drain.copier.copy_pass() == (1, False)

    def drain() -> None:
        with rcv._lock:
            rcv.drain.drain_binary(tb)
        rcv.drain.send_outbox()

    t = threading.Thread(target=drain)
    t.start()
    try:
        assert entered.wait(5), "the drain never reached the next consumer"
        took = rcv._lock.acquire(timeout=2)   # what discovery does to attach a new process
        assert took, "the receiver lock is held while the next consumer blocks"
        rcv._lock.release()
    finally:
        release.set()
        t.join(10)
    assert out.names == [str(i) for i in range(10)]
