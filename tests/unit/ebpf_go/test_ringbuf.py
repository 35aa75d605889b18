"""The ring-buffer reader (receiver/ebpf_go/ringbuf.py): records come out exactly (count and bytes),
across the wrap-around, stopping at a record still being written and skipping discarded ones.

Without root, the mapping is imitated with a memfd laid out as the kernel lays out a ringbuf
map (consumer page, producer page, data twice). With root, a real BPF ring buffer is filled by a
small XDP program run through BPF_PROG_TEST_RUN (bpf_ringbuf_output of the packet's first N bytes).
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from receiver.ebpf_go import bpfsys
from receiver.ebpf_go.ringbuf import BUSY, DISCARD, PAGE, RingBuffer, wait_any

IS_ROOT = os.geteuid() == 0


class FakeRing:
    """A memfd with the ringbuf map layout; `put` writes a record as the kernel would."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("ringbuf-test")
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.mm = mmap.mmap(self.fd, 2 * PAGE + 2 * size)
        self.prod = 0

    def cons(self) -> int:
        return int(struct.unpack_from("<Q", self.mm, 0)[0])

    def put(self, data: bytes, flags: int = 0, commit: bool = True) -> None:
        n = len(data)
        total = (n + 8 + 7) & ~7
        assert self.prod + total - self.cons() <= self.size, "fake ring full"
        rec = struct.pack("<II", n | flags, 0) + data + b"\0" * (total - 8 - n)
        for i, b in enumerate(rec):  # the data area is mapped twice: write both copies
            off = (self.prod + i) % self.size
            self.mm[2 * PAGE + off] = b
            self.mm[2 * PAGE + self.size + off] = b
        self.prod += total
        if commit:
            struct.pack_into("<Q", self.mm, PAGE, self.prod)

    def set_header(self, pos: int, value: int) -> None:
        for base in (2 * PAGE, 2 * PAGE + self.size):
            struct.pack_into("<I", self.mm, base + pos % self.size, value)

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@pytest.fixture
def fake() -> Iterator[FakeRing]:
    f = FakeRing(4096)
    yield f
    f.close()


def test_records_exact_and_consumer_advanced(fake: FakeRing) -> None:
    rb = RingBuffer(fake.fd, fake.size)
    recs = [bytes([i]) * n for i, n in enumerate([1, 7, 8, 9, 100, 688])]
    for r in recs:
        fake.put(r)
    assert rb.read() == recs
    assert fake.cons() == fake.prod
    assert rb.read() == []
    rb.close()


def test_wrap_around_many_rounds(fake: FakeRing) -> None:
    rb = RingBuffer(fake.fd, fake.size)
    rnd = random.Random(7)
    sent, got = [], []
    for _ in range(200):
        for _ in range(rnd.randint(1, 4)):
            r = rnd.randbytes(rnd.randint(1, 900))
            fake.put(r)
            sent.append(r)
        got += rb.read()
    assert got == sent
    assert fake.prod > 20 * fake.size  # wrapped many times
    rb.close()


def test_stops_at_busy_and_skips_discarded(fake: FakeRing) -> None:
    rb = RingBuffer(fake.fd, fake.size)
    fake.put(b"a" * 10)
    fake.put(b"gone", flags=DISCARD)
    busy_at = fake.prod
    fake.put(b"b" * 20, flags=BUSY)
    fake.put(b"c" * 30)
    assert rb.read() == [b"a" * 10]
    assert fake.cons() == busy_at  # the discarded record is consumed, the busy one waits
    fake.set_header(busy_at, 20)   # the producer commits it
    assert rb.read() == [b"b" * 20, b"c" * 30]
    rb.close()


def test_read_unpacked_and_short_records(fake: FakeRing) -> None:
    layout = struct.Struct("<IQ")
    rb = RingBuffer(fake.fd, fake.size)
    fake.put(layout.pack(1, 2) + b"tail")
    fake.put(b"xx")
    fake.put(layout.pack(3, 4))
    assert rb.read_unpacked(layout) == ([(1, 2), (3, 4)], 1)
    rb.close()


def test_limit_keeps_the_rest(fake: FakeRing) -> None:
    rb = RingBuffer(fake.fd, fake.size)
    for i in range(5):
        fake.put(bytes([i]) * 16)
    assert len(rb.read(limit=2)) == 2
    assert rb.read() == [bytes([i]) * 16 for i in range(2, 5)]
    rb.close()


WATCHER_C = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
/* Reads consumer_pos (u64 at offset 0) with 8-byte loads until the u32 at offset 64 is set:
   prints how many reads saw it go backwards (a partly written or zeroed store), and how many reads. */
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    volatile uint64_t *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
    volatile uint32_t *stop = (volatile uint32_t *)((char *)p + 64);
    uint64_t last = 0; long back = 0, reads = 0;
    printf("ready\n"); fflush(stdout);
    while (!*stop) { uint64_t x = *p; reads++; if (x < last) back++; last = x; }
    printf("%ld %ld\n", back, reads);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None or (os.cpu_count() or 1) < 2, reason="needs cc and 2 CPUs")
def test_consumer_pos_store_is_never_seen_partial(fake: FakeRing, tmp_path: Path) -> None:
    """The kernel reads consumer_pos while we write it: a store that passes through 0 (struct.pack_into
    zero-fills the field first) makes bpf_ringbuf_reserve fail on an almost empty ring. A C reader on
    another CPU must never see it go backwards over 100 000 commits."""
    src = tmp_path / "watch.c"
    src.write_text(WATCHER_C)
    exe = tmp_path / "watch"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    rb = RingBuffer(fake.fd, fake.size)
    w = subprocess.Popen([str(exe), f"/proc/self/fd/{fake.fd}"], stdout=subprocess.PIPE, text=True,
                         pass_fds=(fake.fd,))
    assert w.stdout is not None
    assert w.stdout.readline() == "ready\n"
    pos = 0x02D7FFA8  # crosses byte boundaries as it grows
    for _ in range(100_000):
        pos += 696
        rb._commit(pos)
    struct.pack_into("<I", fake.mm, 64, 1)
    back, reads = map(int, w.stdout.readline().split())
    w.wait()
    rb.close()
    assert fake.cons() == pos
    assert reads > 0
    assert back == 0


# ---------------------------------------------------------------- a real ring buffer


def _ringbuf_output_prog(rb_fd: int, buf_fd: int, n: int) -> int:
    """XDP: copy the packet's first n bytes into a 1 KiB array value (bpf_xdp_load_bytes), then
    bpf_ringbuf_output(rb, value, n, 0); XDP_PASS."""
    ins = struct.Struct("<BBhi")
    code = [
        ins.pack(0xBF, 0x16, 0, 0),         # r6 = r1 (ctx)
        ins.pack(0x62, 0x0A, -4, 0),        # *(u32 *)(r10 - 4) = 0
        ins.pack(0xBF, 0xA2, 0, 0),         # r2 = r10
        ins.pack(0x07, 0x02, 0, -4),        # r2 += -4
        ins.pack(0x18, 0x11, 0, buf_fd),    # r1 = buf map
        ins.pack(0x00, 0x00, 0, 0),
        ins.pack(0x85, 0x00, 0, 1),         # call bpf_map_lookup_elem
        ins.pack(0x15, 0x00, 13, 0),        # if r0 == 0 goto out
        ins.pack(0xBF, 0x07, 0, 0),         # r7 = r0
        ins.pack(0xBF, 0x61, 0, 0),         # r1 = r6
        ins.pack(0xB7, 0x02, 0, 0),         # r2 = 0 (offset)
        ins.pack(0xBF, 0x73, 0, 0),         # r3 = r7
        ins.pack(0xB7, 0x04, 0, n),         # r4 = n
        ins.pack(0x85, 0x00, 0, 189),       # call bpf_xdp_load_bytes
        ins.pack(0x55, 0x00, 6, 0),         # if r0 != 0 goto out
        ins.pack(0x18, 0x11, 0, rb_fd),     # r1 = ring buffer
        ins.pack(0x00, 0x00, 0, 0),
        ins.pack(0xBF, 0x72, 0, 0),         # r2 = r7
        ins.pack(0xB7, 0x03, 0, n),         # r3 = n
    ]
    code += [
        ins.pack(0xB7, 0x04, 0, 0),         # r4 = 0
        ins.pack(0x85, 0x00, 0, 130),       # call bpf_ringbuf_output
        ins.pack(0xB7, 0x00, 0, 2),         # out: r0 = XDP_PASS
        ins.pack(0x95, 0x00, 0, 0),         # exit
    ]
    return bpfsys.prog_load(bpfsys.PROG_XDP, b"".join(code), "GPL", f"rbtest{n}")


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root")
def test_real_ring_buffer_exact_with_wrap_around() -> None:
    size = 4096
    fd = bpfsys.map_create(bpfsys.MapSpec("rbtest", bpfsys.MAP_RINGBUF, 0, 0, size))
    buf = bpfsys.map_create(bpfsys.MapSpec("rbtest_buf", bpfsys.MAP_ARRAY, 4, 1024, 1))
    progs: dict[int, int] = {}
    rb = RingBuffer(fd, size)
    try:
        rnd = random.Random(11)
        sent, got = [], []
        for _ in range(60):
            for _ in range(rnd.randint(1, 5)):
                n = rnd.choice([1, 13, 64, 200, 688, 700])
                if n not in progs:
                    progs[n] = _ringbuf_output_prog(fd, buf, n)
                pkt = rnd.randbytes(max(n, 64))
                assert bpfsys.prog_test_run(progs[n], pkt) == 2
                sent.append(pkt[:n])
            got += rb.read()
        assert len(got) == len(sent) and got == sent
        assert sum((len(r) + 15) & ~7 for r in sent) > 10 * size  # wrapped
    finally:
        rb.close()
        for p in progs.values():
            os.close(p)
        os.close(fd)
        os.close(buf)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root")
def test_wait_any_reports_data_until_read() -> None:
    """The reader loop's idle wait: level-triggered on available data (no timeout is waited out here)."""
    size = 4096
    fds = [bpfsys.map_create(bpfsys.MapSpec(f"rbwait{i}", bpfsys.MAP_RINGBUF, 0, 0, size)) for i in range(2)]
    buf = bpfsys.map_create(bpfsys.MapSpec("rbwait_buf", bpfsys.MAP_ARRAY, 4, 1024, 1))
    rings = [RingBuffer(fd, size) for fd in fds]
    prog = _ringbuf_output_prog(fds[1], buf, 64)
    try:
        assert wait_any(rings, 0) is False
        assert wait_any([], 0) is False
        assert bpfsys.prog_test_run(prog, bytes(range(64))) == 2
        assert wait_any(rings, 0) is True
        assert wait_any(rings[:1], 0) is False
        assert rings[1].read() == [bytes(range(64))]
        assert wait_any(rings, 0) is False
    finally:
        for r in rings:
            r.close()
        os.close(prog)
        for fd in (*fds, buf):
            os.close(fd)
