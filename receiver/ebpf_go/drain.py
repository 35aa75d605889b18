"""From the ring buffers to the next consumer: the `ebpf_go` receiver's hot path.

`RingCopier` (ringbuf.py, its own thread) copies each binary's ring buffers every 10 ms into a
bounded queue of record blocks, so ring space is released at once however long the pipeline takes.
`SpanDrain` takes those blocks under the receiver's lock (discovery attaches and releases
binaries under the same lock), decodes them, turns them into spans (the probe's `spans`), groups
them by process into one batch per probe and drain, hands them to the stitcher, and leaves the
batches in an outbox; `send_outbox` pushes them to the next consumer *after* the lock is
released, so a pipeline that blocks (a full batch processor) never stalls discovery with it.

`run` is the reader thread's loop. Plain loops over batches: nothing here is done per record that
could be done once per drain.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping

from collector.component import Consumer
from collector.errors import ConsumerError
from collector.spans import Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch
from collector.telemetry import ComponentTelemetry

from . import events
from .probes.spec import LOST_MAP, UNSAMPLED_MAP
from .propagation.stitch import Stitcher, StreamKey
from .receiver_metrics import ReceiverMetrics
from .ringbuf import RingCopier
from .traced import DISTRO, VERSION, ProcessState, TracedBinary

COUNTS_INTERVAL_S = 1.0      # how often the sk_msg counters are read
COPY_PERIOD_S = 0.01         # the copier empties every ring buffer this often (while records come)
DRAIN_PERIOD_S = 0.02        # the reader turns the copied records into spans this often (ditto)
IDLE_WAIT_S = 0.1            # longest idle sleep of the copier (epoll) and of the reader holding stitch spans
QUEUE_RINGS = 4              # records copied and not yet read, per ring buffer: at most this many ring-fulls
QUEUE_TOTAL_RINGS = 16       # ... and for all ring buffers together (64 MiB at the default ring_buffer_size)


class SpanDrain:
    """Records of the traced binaries -> span batches -> the next consumer.

    `binaries` and `processes` are the receiver's (the tracker fills them), read here under `lock`.
    `stitcher` is set by the propagation chooser once the mode is known (None: no stitching)."""

    def __init__(self, lock: threading.Lock, binaries: dict[tuple[int, int], TracedBinary],
                 processes: dict[int, ProcessState], metrics: ReceiverMetrics, telemetry: ComponentTelemetry,
                 next_consumer: Consumer, ring_buffer_size: int) -> None:
        self._lock = lock
        self.binaries = binaries
        self.processes = processes
        self.metrics = metrics
        self.telemetry = telemetry
        self.next_consumer = next_consumer
        self.mono_to_unix = events.monotonic_to_unix_offset()
        self.stitcher: Stitcher | None = None
        # Batches decoded under _lock wait here and go to the next consumer after it is released:
        # a pipeline that blocks (a full batch processor) must not stall discovery with it.
        self._outbox: list[SpanBatch] = []
        self._scopes: dict[str, Scope] = {}
        # Copies every ring buffer into a bounded queue on its own thread (its own lock, so it never
        # waits for the reader's pipeline); the reader takes from it. See run.
        self.copier = RingCopier(COPY_PERIOD_S, IDLE_WAIT_S, on_error=self._copy_error,
                                 max_total_bytes=QUEUE_TOTAL_RINGS * ring_buffer_size)

    def add_rings(self, tb: TracedBinary) -> None:
        for pp in tb.programs:
            ring = pp.collector.ring
            if ring is not None:
                # raw blocks (bytes, which the GC does not track), decoded by drain_binary
                self.copier.add(ring, ring.read_block, QUEUE_RINGS * ring.size)

    def remove_rings(self, tb: TracedBinary) -> None:
        """Before its ring buffers are unmapped: the copier never reads an unmapped ring."""
        for pp in tb.programs:
            if pp.collector.ring is not None:
                self.copier.remove(pp.collector.ring)

    def run(self, stop: threading.Event, read_counts: Callable[[], None]) -> None:
        """Turn the records the copier took out of the ring buffers (`RingCopier`, every 10 ms, on its
        own thread) into spans and push them, every `DRAIN_PERIOD_S` counted from the start of the
        previous drain (one that took longer is followed by the next at once), so a drain finds
        rate x period records however long the pipeline took; the ring buffers stay emptied
        meanwhile. After a drain that found nothing, sleep until the copier copies something, at
        most a second (`read_counts`: the sk_msg counters), or IDLE_WAIT_S while the stitcher holds
        spans."""
        ready = self.copier.ready
        next_counts = 0.0
        while not stop.is_set():
            started = time.monotonic()
            ready.clear()   # set again by a copy from now on: the wait below does not miss it
            n = 0
            with self._lock:
                for tb in list(self.binaries.values()):
                    n += self.drain_binary(tb)
            self.send_outbox()
            if self.stitcher is not None:
                self.consume(self.stitcher.flush())
            now = time.monotonic()
            if now >= next_counts:
                next_counts = now + COUNTS_INTERVAL_S
                read_counts()
            if n == 0:
                held = self.stitcher is not None and self.stitcher.pending() > 0
                ready.wait(IDLE_WAIT_S if held else max(0.0, next_counts - time.monotonic()))
            else:
                stop.wait(max(0.0, started + DRAIN_PERIOD_S - time.monotonic()))

    def _copy_error(self, e: BaseException) -> None:
        self.telemetry.warn_once_per("copy", 60, "cannot copy ring buffer records: %s", e)

    def drain_binary(self, tb: TracedBinary, final: bool = False) -> int:
        """Push one batch per probe of this binary: the records the copier holds, then those still in
        the ring buffer; returns the records read. `final`: the copier lets go of the ring buffers
        too (before they are closed). Called with the lock held; the batches wait in the outbox
        (`send_outbox` after the lock is released)."""
        n = 0
        copier = self.copier
        metrics = self.metrics
        for pp in tb.programs:
            ring = pp.collector.ring
            if ring is None:
                continue
            # A reader behind takes its backlog one ring-full per drain: batches no larger than before
            # the copier, and the rest waits as records (not spans in flight for the GC to walk).
            # The copier's queue holds bytes blocks (no objects for the GC to count and walk): decoded
            # here, just before to_spans.
            records = pp.collector.decode(copier.remove(ring) if final else copier.take(ring, ring.size))
            n += len(records)
            lost = pp.program.bpf[LOST_MAP].read_u64(0)
            if lost != pp.lost_seen:
                metrics.lost.inc(lost - pp.lost_seen)
                self.telemetry.warn_once_per("lost", 60, "ring buffer full: %d %s records lost so far "
                                             "(ring_buffer_size)", lost, pp.probe.name)
                pp.lost_seen = lost
            sampling = bool(pp.build.sampler)     # without a sampler every span is a record: no counts
            unsampled = pp.program.bpf[UNSAMPLED_MAP].read_u64(0) if sampling else 0
            if unsampled != pp.unsampled_seen:
                metrics.sampler.labels(probe=pp.probe.name, decision="unsampled").inc(unsampled - pp.unsampled_seen)
                pp.unsampled_seen = unsampled
            if not records:
                continue
            metrics.events.inc(len(records))
            if sampling:
                metrics.sampler.labels(probe=pp.probe.name, decision="sampled").inc(len(records))
            try:
                spans = pp.probe.spans(records, pp.state, tb.binary, self.mono_to_unix, pp.build)
            except Exception:  # our bug: keep reading
                self.telemetry.warn_once_per(f"decode-{pp.probe.name}", 60, "%s: cannot decode records",
                                             pp.probe.name)
                continue
            metrics.count_writer_outcomes(getattr(pp.state, "outcomes", None))
            self._push(spans, pp.probe.scope, getattr(pp.state, "injected", ()), getattr(pp.state, "h2_streams", None))
        return n

    def drain_final(self) -> None:
        """At shutdown, with the lock held: every binary's last records, then what the stitcher holds."""
        for tb in list(self.binaries.values()):
            self.drain_binary(tb, final=True)   # what the copier holds, then what is still in the rings
        if self.stitcher is not None:
            self._outbox.append(self.stitcher.flush(force=True))

    def _push(self, spans: list[tuple[int, Span]], scope_name: str, settled: Collection[bytes] = (),
              streams: Mapping[bytes, StreamKey] | None = None) -> None:
        """Group by process into a batch, through the stitcher: `settled` client spans propagated
        their context already; `streams` keys gRPC spans by their HTTP/2 stream (stitch.py)."""
        by_pid: dict[int, list[Span]] = {}
        for pid, span in spans:
            by_pid.setdefault(pid, []).append(span)
        scope = self._scopes.get(scope_name)
        if scope is None:
            scope = self._scopes[scope_name] = Scope(f"{DISTRO}/{scope_name}", VERSION)
        rss = []
        for pid, lst in by_pid.items():
            st = self.processes.get(pid)
            res = st.resource if st is not None else Resource({"process.pid": pid, "telemetry.distro.name": DISTRO})
            rss.append(ResourceSpans(res, [ScopeSpans(scope, lst)]))
        batch = SpanBatch(rss)
        if self.stitcher is not None:
            batch = self.stitcher.process(batch, settled, streams)
        self._outbox.append(batch)

    def send_outbox(self) -> None:
        """Push what drains decoded; call without the lock (the next consumer may block)."""
        with self._lock:
            batches, self._outbox = self._outbox, []
        for batch in batches:
            self.consume(batch)

    def consume(self, batch: SpanBatch) -> None:
        n = sum(len(ss.spans) for rs in batch.resource_spans for ss in rs.scope_spans)
        if n == 0:
            return
        try:
            self.next_consumer.consume(batch)
            self.metrics.accepted.inc(n)
        except ConsumerError as e:
            self.metrics.refused.inc(n)
            self.telemetry.warn_once_per("refused", 10, "next consumer refused %d spans: %s", n, e)
