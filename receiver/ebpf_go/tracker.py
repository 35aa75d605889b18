"""Which processes the `ebpf_go` receiver traces, on the discovery thread: each scan of /proc
(discovery.ProcessWatcher) starts tracing the new processes that match a target and stops
tracing those that exited.

Per binary (device, inode), once: read it (gobinary), build its probe programs
(probeprograms.ProgramBuilder), hand its ring buffers to the drain. Per process: attach the
uprobes, filtered to its pid, and build its resource; on exit, drain its last spans and detach.
A binary without a traced process keeps its programs for `program_linger` (a restarted process
reuses them instead of paying a compile again), then they are released. The binaries and processes
are the receiver's dicts, changed under its lock, which the drain reads them under.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from collector.telemetry import ComponentTelemetry

from . import discovery, identity
from .bpfprogram import attach, close_programs, detach_pid
from .config import EbpfGoConfig, selectors
from .drain import SpanDrain
from .gobinary import BinaryError, GoBinary, NotGoBinary
from .probeprograms import ProgramBuilder
from .probes import Probe
from .propagation import SkMsgPropagation
from .receiver_metrics import ReceiverMetrics
from .traced import ProcessState, TracedBinary, process_resource


class ProcessTracker:
    """Starts and stops tracing processes and their binaries.

    `builder` is set by the receiver's start, once the host is checked (kernel headers, images);
    `skmsg` returns the sk_msg propagation when that is the mode (it watches traced pids' sockets)."""

    def __init__(self, config: EbpfGoConfig, probes: list[Probe], binaries: dict[tuple[int, int], TracedBinary],
                 processes: dict[int, ProcessState], lock: threading.Lock, drain: SpanDrain,
                 metrics: ReceiverMetrics, telemetry: ComponentTelemetry, stop: threading.Event,
                 skmsg: Callable[[], SkMsgPropagation | None]) -> None:
        self.config = config
        self.probes = probes
        self.binaries = binaries
        self.processes = processes
        self._lock = lock
        self.drain = drain
        self.metrics = metrics
        self.log = telemetry.logger
        self._stop = stop
        self._skmsg = skmsg
        self.selectors = selectors(config)
        self.rejected: dict[tuple[int, int], str] = {}    # binary key -> why it is not traced
        self.watcher = discovery.ProcessWatcher(exclude_pids={os.getpid()})
        self.host = identity.host_attributes()   # host.name, host.id, os.type: read once
        self.scan_seconds: list[float] = []
        self.builder: ProgramBuilder | None = None

    def run(self) -> None:
        """The discovery thread: a scan every discovery_interval until stopped."""
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.scan_once()
            except Exception:  # our bug: log it, keep tracing what is attached
                self.log.exception("ebpf_go discovery failed")
            self.scan_seconds.append(time.monotonic() - t0)
            del self.scan_seconds[:-100]
            self._stop.wait(self.config.discovery_interval)

    def scan_once(self) -> None:
        new, gone = self.watcher.poll()
        for pid in gone:
            self._process_exited(pid)
        for p in new:
            if self._stop.is_set():
                return
            sel = self._match(p)
            if sel is not None:
                self._process_started(p, sel)
        self.close_idle()

    def close_idle(self) -> None:
        """Release the binaries without a traced process for program_linger."""
        now = time.monotonic()
        for tb in list(self.binaries.values()):
            if tb.idle_since is not None and now - tb.idle_since >= self.config.program_linger:
                with self._lock:
                    self.drain.drain_binary(tb, final=True)
                    self.close_binary(tb)
                    del self.binaries[tb.key]
                self.drain.send_outbox()
                self.log.info("released the programs of %s (no traced process for %.0fs)", tb.exe,
                              self.config.program_linger)

    def close_all(self) -> None:
        """At shutdown, with the lock held and the drain done: release every binary, every uprobe of
        all of them detached at once (bpfsys: the kernel's waits overlap)."""
        for tb in self.binaries.values():
            self.drain.remove_rings(tb)
        close_programs([pp.program for tb in self.binaries.values() for pp in tb.programs])
        for tb in self.binaries.values():
            tb.programs.clear()
        self.binaries.clear()
        self.processes.clear()

    def _match(self, p: discovery.ProcInfo) -> discovery.Selector | None:
        if not self.selectors:
            return discovery.Selector()
        for s in self.selectors:
            if s.matches(p):
                return s
        return None

    def _binary_for(self, p: discovery.ProcInfo) -> TracedBinary | None:
        key = p.binary_key
        tb = self.binaries.get(key)
        if tb is not None or key in self.rejected:
            return tb
        try:
            gb = GoBinary.open(p.exe_link)
        except BinaryError as e:
            self._reject(key, p, str(e), "not_go" if isinstance(e, NotGoBinary) else "unreadable", debug=True)
            return None
        except OSError as e:
            self._reject(key, p, f"cannot read the executable: {e}", "unreadable", debug=True)
            return None
        assert self.builder is not None
        wanted = [pr for pr in self.probes if pr.wanted(gb, self.builder.common)]
        if not wanted:
            self._reject(key, p, "no instrumented library in it (or all disabled)", "no_probes", debug=True)
            return None
        tb = TracedBinary(key, gb, p.exe, self.builder.build(gb, wanted, p))
        gb.release_dwarf()  # every offset the probes need is known now (and kept by gb)
        if not tb.programs:
            self.rejected[key] = "every probe failed"
            return None
        with self._lock:
            self.binaries[key] = tb
            self.drain.add_rings(tb)
        return tb

    def _reject(self, key: tuple[int, int], p: discovery.ProcInfo, why: str, reason: str,
                debug: bool = False) -> None:
        self.rejected[key] = why
        self.metrics.errors.labels(reason=reason).inc()
        (self.log.debug if debug else self.log.warning)(
            "not tracing %s: %s", p.exe, why, extra={"pid": p.pid, "exe": p.exe})

    def _process_started(self, p: discovery.ProcInfo, sel: discovery.Selector) -> None:
        tb = self._binary_for(p)
        if tb is None:
            return
        gb = tb.binary
        n = 0
        for pp in tb.programs:
            try:
                probe = pp.probe
                attach(pp.program, p.pid, lambda bpf, pid: probe.attach(bpf, gb, p.exe_link, pid,  # noqa: B023
                                                                     pp.build))  # noqa: B023
                n += len(pp.program.links.get(p.pid, []))
            except Exception as e:  # KernelError or the module's ProbeUnavailable: this probe is off here
                detach_pid(pp.program, p.pid)
                self.metrics.errors.labels(reason="attach").inc()
                self.log.warning("%s probe off for pid %d: %s", pp.probe.name, p.pid, e,
                                 extra={"pid": p.pid, "exe": p.exe})
        if n == 0:
            return
        if not self.watcher.still_same(p):  # exited (and maybe reused) while we attached
            for pp in tb.programs:
                detach_pid(pp.program, p.pid)
            return
        tb.pids[p.pid] = p
        tb.idle_since = None
        self.processes[p.pid] = ProcessState(p, process_resource(p, gb, sel, self.host), tb.key)
        sk = self._skmsg()
        if sk is not None:
            sk.watch(p.pid)    # its connections from now on can carry an inserted traceparent
        self.update_gauges()
        self.log.info("tracing pid %d %s (%s): %d uprobes (%s)", p.pid, p.exe, gb.go_version, n,
                      ", ".join(pp.probe.name for pp in tb.programs if p.pid in pp.program.links),
                      extra={"pid": p.pid, "exe": p.exe})

    def _process_exited(self, pid: int) -> None:
        st = self.processes.pop(pid, None)
        if st is None:
            return
        sk = self._skmsg()
        if sk is not None:
            sk.unwatch(pid)
        tb = self.binaries.get(st.binary_key)
        if tb is None:
            return
        with self._lock:
            self.drain.drain_binary(tb)      # its last spans first, while the resource is known
            tb.pids.pop(pid, None)
            for pp in tb.programs:
                detach_pid(pp.program, pid)
            if not tb.pids:
                # Kept for program_linger: a restarted process (crash loop, deploy) reuses the
                # compiled programs instead of paying a ~2 s compile again. No uprobe stays attached.
                tb.idle_since = time.monotonic()
                if self.config.program_linger <= 0:
                    self.drain.drain_binary(tb, final=True)
                    self.close_binary(tb)
                    del self.binaries[tb.key]
        self.drain.send_outbox()
        self.update_gauges()
        self.log.info("pid %d exited: probes detached", pid, extra={"pid": pid, "exe": st.info.exe})

    def close_binary(self, tb: TracedBinary) -> None:
        """Free its programs, maps and ring buffers; drain first (`drain_binary(tb, final=True)`)."""
        self.drain.remove_rings(tb)   # the copier never reads an unmapped ring
        close_programs([pp.program for pp in tb.programs])
        tb.programs.clear()

    def update_gauges(self) -> None:
        self.metrics.processes.set(len(self.processes))
        for pr in self.probes:
            self.metrics.probes.labels(probe=pr.name).set(sum(
                pp.program.link_count() for tb in self.binaries.values() for pp in tb.programs if pp.probe is pr))
