"""The `ebpf_go` receiver: traces Go programs on this host with eBPF uprobes, untouched.

Config model first, then the factory, then the receiver. How it works and every option:
receiver/ebpf_go/README.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Receiver
from collector.configtypes import Duration
from collector.errors import ConsumerError, KernelError, UserError
from collector.spans import Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch
from collector.telemetry import ComponentTelemetry

from . import bpfprogram, discovery, events, hostfs, preflight, propagation
from .gobinary import BinaryError, GoBinary, NotGoBinary
from .images import ImageStore
from .probes import PROBES, Build, Probe, RawCollector, ctx_readers
from .probes.spec import LOST_MAP, RINGBUF
from .propagation.skmsg import HELD_ELSEWHERE_HINT
from .propagation.stitch import Stitcher
from .ringbuf import RingCopier

DISTRO = "otelgo-collector"
VERSION = "0.1.0"
STITCH_WINDOW_S = 2.0        # how long a stitch candidate waits for its other side and the next hop
STITCH_MAX_PENDING = 20000   # candidates held at most (the oldest leave unchanged beyond)
COUNTS_INTERVAL_S = 1.0      # how often the sk_msg counters are read
COMPILE_PARALLEL = 2         # BPF compiler children at once (each ~1.5 s of one core)
COPY_PERIOD_S = 0.01         # the copier empties every ring buffer this often (while records come)
DRAIN_PERIOD_S = 0.02        # the reader turns the copied records into spans this often (ditto)
IDLE_WAIT_S = 0.1            # longest idle sleep of the copier (epoll) and of the reader holding stitch spans
CHOOSER_JOIN_S = 60.0        # how long shutdown waits for the propagation chooser (see shutdown)
QUEUE_RINGS = 4              # records copied and not yet read, per ring buffer: at most this many ring-fulls
QUEUE_TOTAL_RINGS = 16       # ... and for all ring buffers together (64 MiB at the default ring_buffer_size)


# ---------------------------------------------------------------- config


class TargetConfig(ComponentConfig):
    """Which processes to trace: every condition set must hold."""

    exe_path: str | None = None           # glob on the executable's path, e.g. /srv/*/bin/api
    pid: list[int] | None = None          # one pid or a list
    name: str | None = None               # regex on the process name, executable name or command line
    open_ports: list[int] | None = None   # TCP ports the process listens on
    service_name: str | None = None       # service.name for these processes
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)  # extra resource attributes

    @field_validator("pid", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("name")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        import re
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"name: invalid regular expression {v!r}: {e}") from None
        return v


class _Instrumentations(ComponentConfig):
    """`instrumentations`: one switch per probe of the registry (probes/__init__.py), on by default."""


InstrumentationsConfig = create_model(  # type: ignore[call-overload]
    "InstrumentationsConfig", __base__=_Instrumentations, **{p.name: (bool, True) for p in PROBES})


class EbpfGoConfig(ComponentConfig):
    # No targets: every Go process on the host except the collector itself.
    targets: list[TargetConfig] = Field(default_factory=list)
    instrumentations: InstrumentationsConfig = Field(default_factory=InstrumentationsConfig)
    kernel_headers: str = "auto"
    ring_buffer_size: int = 1 << 22     # bytes per traced binary and probe; a power of two >= 4096
    max_inflight_calls: int = 16384     # per-call state entries (LRU) per binary and probe
    propagation: Literal["auto", "probe_write", "sk_msg", "stitch", "off"] = "auto"
    discovery_interval: Duration = 1.0  # how often /proc is scanned for new and exited processes
    program_linger: Duration = 30.0     # keep a binary's compiled programs this long after its last process
    include_db_statement: bool = False  # database_sql options (probes/database_sql.py)
    sanitize_db_statement: bool = True
    db_statement_max_length: int = 1024
    # Compiled BPF program images, reused across restarts ("" disables the disk cache).
    bpf_cache_dir: str = "/var/cache/otelgo-collector/bpf"

    @model_validator(mode="after")
    def _check(self) -> EbpfGoConfig:
        n = self.ring_buffer_size
        if n < 4096 or n & (n - 1):
            raise ValueError(f"ring_buffer_size: {n} must be a power of two of at least 4096 bytes, e.g. 1048576")
        if not 16 <= self.max_inflight_calls <= 1 << 20:
            raise ValueError(f"max_inflight_calls: {self.max_inflight_calls} must be between 16 and 1048576")
        if self.discovery_interval <= 0:
            raise ValueError("discovery_interval: must be greater than 0, e.g. 1s")
        return self


def probe_options(cfg: EbpfGoConfig) -> dict[str, Any]:
    """Each probe's options, read from this receiver's config by the probe itself."""
    return {p.name: p.options_from(cfg) for p in PROBES}


PIN_DIR_RE = re.compile(r"^otelgo-(\d+)-")   # a receiver's pin directory: otelgo-<collector pid>-<id>


def remove_pin_dir(path: str) -> None:
    """Unlink what is pinned in `path`, then the directory (a map's memory is freed once nothing
    holds it: a pin is such a holder, and outlives the collector)."""
    try:
        for f in os.listdir(path):
            os.unlink(os.path.join(path, f))
        os.rmdir(path)
    except OSError:
        pass


def remove_stale_pin_dirs(base: str) -> list[str]:
    """Remove the pin directories of collectors that are gone (killed: no shutdown ran), so that
    their maps do not stay in kernel memory for good; returns their names. A directory whose pid
    runs is left alone: it may be another collector's (or the pid was reused: kept, the safe side).
    The pid is read in our pid namespace, the host's, as the uprobes' pid filters already need."""
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in sorted(names):
        m = PIN_DIR_RE.match(name)
        if m is None or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        remove_pin_dir(os.path.join(base, name))
        removed.append(name)
    return removed


# ---------------------------------------------------------------- state


@dataclass
class ProbeProgram:
    """One probe's program for one binary."""

    probe: Probe
    program: bpfprogram.Program
    collector: RawCollector
    state: Any
    build: Build         # what the program was compiled with: attach and spans use the same
    lost_seen: int = 0


@dataclass
class TracedBinary:
    """One executable (device, inode): its programs and the processes of it we trace."""

    key: tuple[int, int]
    binary: GoBinary
    exe: str
    programs: list[ProbeProgram] = field(default_factory=list)
    pids: dict[int, discovery.ProcInfo] = field(default_factory=dict)
    idle_since: float | None = None   # monotonic time its last traced process exited


@dataclass
class ProcessState:
    info: discovery.ProcInfo
    resource: Resource
    binary_key: tuple[int, int]


def _selectors(cfg: EbpfGoConfig) -> list[discovery.Selector]:
    return [discovery.Selector(t.exe_path, t.pid, t.name, t.open_ports, t.service_name, t.attributes)
            for t in cfg.targets]


class EbpfGoReceiver(Receiver):
    def __init__(self, id: ComponentID, config: EbpfGoConfig, telemetry: ComponentTelemetry,
                 next_consumer: Consumer) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.config = config
        self.selectors = _selectors(config)
        self.log = telemetry.logger
        m = telemetry.metrics
        self.m_processes = m.gauge("otelgo_ebpf_processes_instrumented", "Processes with probes attached.")
        self.m_probes = m.gauge("otelgo_ebpf_probes_attached", "Uprobes attached, per probe.", ["probe"])
        self.m_events = m.counter("otelgo_ebpf_events", "Ring-buffer records read.")
        self.m_lost = m.counter("otelgo_ebpf_events_lost", "Records dropped in BPF: ring buffer full.")
        self.m_errors = m.counter("otelgo_ebpf_attach_errors", "Processes or probes not traced, by reason.",
                                  ["reason"])
        self.m_tp_injected = m.counter("otelgo_ebpf_propagation_injected",
                                       "Requests whose traceparent sk_msg inserted at the socket.")
        self.m_tp_skipped = m.counter("otelgo_ebpf_propagation_skipped",
                                      "Requests sk_msg left unchanged, by reason.", ["reason"])
        self.m_tp_sockets_skipped = m.counter(
            "otelgo_ebpf_propagation_connections_skipped",
            "Client connections sk_msg cannot watch, by reason (held_elsewhere: another sk_msg program "
            "holds them; not_added: map full or other): their requests are sent unchanged.", ["reason"])
        self.m_stitch = m.counter("otelgo_ebpf_stitch", "Local server spans the stitcher handled, by outcome.",
                                  ["outcome"])
        self.m_compiles = m.counter("otelgo_ebpf_bpf_programs",
                                    "BPF programs prepared, by origin: compiled (a compiler child ran), "
                                    "memory or disk (image cache), error.", ["origin"])
        self.m_accepted = m.receiver_accepted.labels(receiver=str(id), transport="ebpf")
        self.m_refused = m.receiver_refused.labels(receiver=str(id), transport="ebpf")
        self.binaries: dict[tuple[int, int], TracedBinary] = {}
        self.rejected: dict[tuple[int, int], str] = {}    # binary key -> why it is not traced
        self.processes: dict[int, ProcessState] = {}
        self.watcher = discovery.ProcessWatcher(exclude_pids={os.getpid()})
        self.kernel_source: str | None = None
        self.pin_dir = f"/sys/fs/bpf/otelgo-{os.getpid()}-{str(id).replace('/', '_')}"
        self.mono_to_unix = events.monotonic_to_unix_offset()
        self.host_name = socket.gethostname()
        self._lock = threading.Lock()     # binaries/programs: discovery thread vs reader thread
        # Batches decoded under _lock wait here and go to the next consumer after it is released:
        # a pipeline that blocks (a full batch processor) must not stall discovery with it.
        self._outbox: list[SpanBatch] = []
        # Copies every ring buffer into a bounded queue on its own thread (its own lock, so it never
        # waits for the reader's pipeline); the reader takes from it. See _reader_loop.
        self.copier = RingCopier(COPY_PERIOD_S, IDLE_WAIT_S, on_error=self._copy_error,
                                 max_total_bytes=QUEUE_TOTAL_RINGS * config.ring_buffer_size)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._propagation_chosen = threading.Event()   # set once self.propagation and common.skmsg are final
        self._propagation_lock = threading.Lock()      # self.propagation: the chooser vs shutdown
        self._chooser: threading.Thread | None = None
        self.enabled = False
        self.common = Build(self.pin_dir, config.max_inflight_calls, config.ring_buffer_size // 4096)
        self.propagation: propagation.PropagationChoice | None = None
        self.stitcher: Stitcher | None = None
        self._skmsg_seen: dict[str, int] = {}
        self._scopes: dict[str, Scope] = {}
        self.probes = [p for p in PROBES if getattr(config.instrumentations, p.name, False)]
        self.scan_seconds: list[float] = []
        self.images: ImageStore | None = None

    # -------------------------------------------------------- lifecycle

    def start(self, host: Host) -> None:
        # What the receiver cannot do without (BCC, privileges, headers, bpffs) fails the collector's
        # start, as in the Go collector: a collector that runs but traces nothing misleads its user.
        preflight.check_bcc()
        preflight.check_privileges()
        self.kernel_source, how = preflight.find_kernel_headers(self.config.kernel_headers)
        self._mount_host_filesystems()
        stale = remove_stale_pin_dirs(os.path.dirname(self.pin_dir))
        if stale:
            self.log.info("removed the BPF maps pinned by %d collector(s) that exited without cleaning up: %s",
                          len(stale), ", ".join(stale))
        try:
            os.makedirs(self.pin_dir, exist_ok=True)
        except OSError as e:
            raise KernelError(f"cannot create the pin directory {self.pin_dir}: {e.strerror}") from None
        self.common = Build(self.pin_dir, self.config.max_inflight_calls, self.config.ring_buffer_size // 4096,
                            options=probe_options(self.config))
        images = self.images = ImageStore(self.config.bpf_cache_dir or None, parallel=COMPILE_PARALLEL,
                                                 log=self.log)
        # The propagation mode (sk_msg: a program to compile or load, sock_ops to attach) is chosen
        # on a thread of its own: only the client probe's program depends on it, so discovery and the
        # other probes' compiles need not wait for it (a cold sk_msg compile took ~0.5 s).
        chooser = threading.Thread(target=self._choose_propagation, args=(images,), name=f"{self.id}-propagation",
                                   daemon=True)
        chooser.start()
        self._chooser = chooser
        self._threads.append(chooser)
        self.enabled = True
        self.log.info("ebpf_go receiver started: %s; tracing %s", how,
                      "every Go process" if not self.selectors else f"{len(self.selectors)} target selector(s)")
        self.copier.start(f"{self.id}-copier")
        for name, fn in (("discovery", self._discovery_loop), ("reader", self._reader_loop)):
            t = threading.Thread(target=fn, name=f"{self.id}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _mount_host_filesystems(self) -> None:
        """bpffs (required: the pins) and securityfs (the lockdown mode, told to the operator once)."""
        base = os.path.dirname(self.pin_dir)
        if hostfs.ensure_bpffs(base):
            self.log.info("mounted bpffs at %s (nothing was mounted there; it stays mounted)", base)
        try:
            if hostfs.ensure_securityfs():
                self.log.info("mounted securityfs at %s to read the kernel lockdown mode", hostfs.SECURITYFS)
        except OSError as e:
            self.log.info("lockdown mode unknown: securityfs not mounted at %s and mounting failed (%s)",
                          hostfs.SECURITYFS, e.strerror)
            return
        mode = hostfs.read_lockdown()
        if mode is not None:
            self.log.info("kernel lockdown: %s (%s)", mode, hostfs.LOCKDOWN_MEANING.get(mode, "unknown mode"))

    def _choose_propagation(self, images: ImageStore) -> None:
        # Without client spans nothing can propagate: report "off".
        requested = self.config.propagation if any(p.uses_propagation for p in self.probes) else "off"
        try:
            try:
                # The sk_msg program comes from the image cache too (no compile on a warm start).
                chosen = propagation.choose(
                    requested, self.log, self.telemetry.metrics, pin_dir=self.pin_dir,
                    make_skmsg=lambda pin_dir: propagation.SkMsgPropagation(pin_dir, images=images))
            except Exception as e:  # propagation is optional: spans still flow without it
                self.log.warning("propagation off: %s", e)
                chosen = propagation.choose("off", self.log, self.telemetry.metrics, pin_dir=self.pin_dir)
            try:
                self.common.skmsg = chosen.mode == "sk_msg"
                self.common.probe_write = chosen.mode == "probe_write"
                if chosen.mode in ("sk_msg", "probe_write", "stitch"):
                    # In sk_msg and probe_write modes the stitcher is the fallback for requests left
                    # unchanged (TLS, h2, large headers, ...): injected client spans never wait in it.
                    self.stitcher = Stitcher(window_s=STITCH_WINDOW_S, max_pending=STITCH_MAX_PENDING,
                                             count=lambda outcome, n: self.m_stitch.labels(outcome=outcome).inc(n))
            except BaseException:
                chosen.stop()   # nobody would hold it
                raise
            with self._propagation_lock:
                # Published last, once the flags and the stitcher are set. A shutdown that came first
                # (it did not wait for this thread) leaves the stop to us: an attached sock_ops link
                # must not outlive the receiver.
                late = self._stop.is_set()
                if not late:
                    self.propagation = chosen
            if late:
                chosen.stop()
        finally:
            self._propagation_chosen.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self.images is not None:
            self.images.close()     # cancels compiles, so the chooser and discovery return promptly
        self.copier.stop(timeout)   # wakes the reader too
        for t in self._threads:
            # The chooser may be inside the kernel's verifier (the sk_msg programs take 1.6 s on an idle
            # host, several times that on a busy one) and cannot be interrupted: wait for it, so that
            # what it attaches is stopped here and not some time after the receiver is gone.
            t.join(max(timeout, CHOOSER_JOIN_S) if t is self._chooser else timeout)
            if t.is_alive():
                self.log.warning("ebpf_go shutdown: thread %s still running after %.0f s; going on without it",
                                 t.name, timeout)
        self._threads.clear()
        with self._lock:
            for tb in list(self.binaries.values()):
                self._drain(tb, final=True)   # what the copier holds, then what is still in the rings
            if self.stitcher is not None:
                self._outbox.append(self.stitcher.flush(force=True))
            for tb in list(self.binaries.values()):
                self._close_binary(tb)
            self.binaries.clear()
            self.processes.clear()
        self._send_outbox()
        self.m_processes.set(0)
        with self._propagation_lock:
            chosen = self.propagation
            if chosen is not None:
                self._read_skmsg_counts()
                self.propagation = None
        if chosen is not None:
            chosen.stop()
        self._unpin()

    def _unpin(self) -> None:
        remove_pin_dir(self.pin_dir)

    # -------------------------------------------------------- discovery

    def _discovery_loop(self) -> None:
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
        self._close_idle()

    def _close_idle(self) -> None:
        now = time.monotonic()
        for tb in list(self.binaries.values()):
            if tb.idle_since is not None and now - tb.idle_since >= self.config.program_linger:
                with self._lock:
                    self._drain(tb, final=True)
                    self._close_binary(tb)
                    del self.binaries[tb.key]
                self._send_outbox()
                self.log.info("released the programs of %s (no traced process for %.0fs)", tb.exe,
                              self.config.program_linger)

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
        wanted = [pr for pr in self.probes if pr.present(gb)]
        if not wanted:
            self._reject(key, p, "no instrumented library in it (or all disabled)", "no_probes", debug=True)
            return None
        tb = TracedBinary(key, gb, p.exe)
        assert self.images is not None
        # Every probe's image is asked for first, so that compiles (child processes) run in parallel.
        pending: list[tuple[Probe, Any, list[str], Build]] = []
        readers = ctx_readers(wanted)
        # The client probe last: its program depends on the propagation mode, which may still be chosen.
        for pr in sorted(wanted, key=lambda pr: pr.uses_propagation):
            if pr.uses_propagation:
                self._propagation_chosen.wait()
            try:
                build = dataclasses.replace(self.common, ctx_readers=readers)
                flags = pr.cflags(gb, build)
                pending.append((pr, self.images.submit(pr.source, flags, self.kernel_source), flags, build))
            except Exception as e:  # ProbeUnavailable (an offset or a function missing), or our bug: this probe is off
                self._probe_off(pr, p, e)
        for pr, fut, flags, build in pending:
            try:
                result = fut.result()
                prog = bpfprogram.load_program(result, bpfprogram.pin_dir_of(flags))
                col = pr.collector()
                col.bind(prog.bpf.ring_buffer(RINGBUF))
            except Exception as e:  # KernelError (compile, map creation): this probe is off
                self._probe_off(pr, p, e)
                continue
            self.m_compiles.labels(origin=result.origin).inc()
            tb.programs.append(ProbeProgram(pr, prog, col, pr.binary_state(gb, build), build))
            how = {"compiled": "compiled", "memory": "reused the image of another binary",
                   "disk": "loaded from the image cache"}[result.origin]
            self.log.info("%s program for %s (%s): %s in %.2fs", pr.name, p.exe, gb.go_version, how,
                          prog.compile_seconds, extra={"pid": p.pid, "exe": p.exe})
        gb.release_dwarf()  # every offset the probes need is known now (and kept by gb)
        if not tb.programs:
            self.rejected[key] = "every probe failed"
            return None
        with self._lock:
            self.binaries[key] = tb
            for pp in tb.programs:
                ring = pp.collector.ring
                if ring is not None:
                    # raw blocks (bytes, which the GC does not track), decoded by _drain
                    self.copier.add(ring, ring.read_block, QUEUE_RINGS * ring.size)
        return tb

    def _probe_off(self, pr: Probe, p: discovery.ProcInfo, e: Exception) -> None:
        self.m_errors.labels(reason="compile" if isinstance(e, UserError) else "unsupported").inc()
        if isinstance(e, UserError):
            self.m_compiles.labels(origin="error").inc()
        self.log.warning("%s probe off for %s: %s", pr.name, p.exe, e, extra={"pid": p.pid, "exe": p.exe})

    def _reject(self, key: tuple[int, int], p: discovery.ProcInfo, why: str, reason: str,
                debug: bool = False) -> None:
        self.rejected[key] = why
        self.m_errors.labels(reason=reason).inc()
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
                bpfprogram.attach(pp.program, p.pid, lambda bpf, pid: probe.attach(bpf, gb, p.exe_link, pid,  # noqa: B023
                                                                            pp.build))  # noqa: B023
                n += len(pp.program.links.get(p.pid, []))
            except Exception as e:  # KernelError or the module's ProbeUnavailable: this probe is off here
                bpfprogram.detach_pid(pp.program, p.pid)
                self.m_errors.labels(reason="attach").inc()
                self.log.warning("%s probe off for pid %d: %s", pp.probe.name, p.pid, e,
                                 extra={"pid": p.pid, "exe": p.exe})
        if n == 0:
            return
        if not self.watcher.still_same(p):  # exited (and maybe reused) while we attached
            for pp in tb.programs:
                bpfprogram.detach_pid(pp.program, p.pid)
            return
        tb.pids[p.pid] = p
        tb.idle_since = None
        self.processes[p.pid] = ProcessState(p, self._resource(p, gb, sel), tb.key)
        sk = self._skmsg()
        if sk is not None:
            sk.watch(p.pid)    # its connections from now on can carry an inserted traceparent
        self._update_gauges()
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
            self._drain(tb)      # its last spans first, while the resource is known
            tb.pids.pop(pid, None)
            for pp in tb.programs:
                bpfprogram.detach_pid(pp.program, pid)
            if not tb.pids:
                # Kept for program_linger: a restarted process (crash loop, deploy) reuses the
                # compiled programs instead of paying a ~2 s compile again. No uprobe stays attached.
                tb.idle_since = time.monotonic()
                if self.config.program_linger <= 0:
                    self._drain(tb, final=True)
                    self._close_binary(tb)
                    del self.binaries[tb.key]
        self._send_outbox()
        self._update_gauges()
        self.log.info("pid %d exited: probes detached", pid, extra={"pid": pid, "exe": st.info.exe})

    def _close_binary(self, tb: TracedBinary) -> None:
        """Free its programs, maps and ring buffers; drain first (`_drain(tb, final=True)`)."""
        for pp in tb.programs:
            if pp.collector.ring is not None:
                self.copier.remove(pp.collector.ring)   # the copier never reads an unmapped ring
            bpfprogram.close_program(pp.program)
        tb.programs.clear()

    def _update_gauges(self) -> None:
        self.m_processes.set(len(self.processes))
        for pr in self.probes:
            self.m_probes.labels(probe=pr.name).set(sum(pp.program.link_count() for tb in self.binaries.values()
                                                       for pp in tb.programs if pp.probe is pr))

    def _resource(self, p: discovery.ProcInfo, gb: GoBinary, sel: discovery.Selector) -> Resource:
        service = sel.service_name or discovery.read_environ(p.pid, "OTEL_SERVICE_NAME") or os.path.basename(p.exe)
        attrs: dict[str, Any] = {
            "service.name": service,
            "process.pid": p.pid,
            "process.executable.path": p.exe,
            "process.runtime.name": "go",
            "process.runtime.version": gb.go_version,
            "host.name": self.host_name,
            "telemetry.distro.name": DISTRO,
            "telemetry.distro.version": VERSION,
        }
        attrs.update(sel.attributes)
        return Resource(attrs)

    # -------------------------------------------------------- events

    def _reader_loop(self) -> None:
        """Turn the records the copier took out of the ring buffers (`RingCopier`, every 10 ms, on its
        own thread) into spans and push them, every `DRAIN_PERIOD_S` counted from the start of the
        previous drain (one that took longer is followed by the next at once), so a drain finds
        rate x period records however long the pipeline took; the ring buffers stay emptied
        meanwhile. After a drain that found nothing, sleep until the copier copies something, at
        most a second (the sk_msg counters), or IDLE_WAIT_S while the stitcher holds spans."""
        ready = self.copier.ready
        next_counts = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            ready.clear()   # set again by a copy from now on: the wait below does not miss it
            n = 0
            with self._lock:
                for tb in list(self.binaries.values()):
                    n += self._drain(tb)
            self._send_outbox()
            if self.stitcher is not None:
                self._consume(self.stitcher.flush())
            now = time.monotonic()
            if now >= next_counts:
                next_counts = now + COUNTS_INTERVAL_S
                self._read_skmsg_counts()
            if n == 0:
                held = self.stitcher is not None and self.stitcher.pending() > 0
                ready.wait(IDLE_WAIT_S if held else max(0.0, next_counts - time.monotonic()))
            else:
                self._stop.wait(max(0.0, started + DRAIN_PERIOD_S - time.monotonic()))

    def _copy_error(self, e: BaseException) -> None:
        self.telemetry.warn_once_per("copy", 60, "cannot copy ring buffer records: %s", e)

    def _skmsg(self) -> propagation.SkMsgPropagation | None:
        """The sk_msg propagation in use, if that is the mode."""
        chosen = self.propagation   # read once: shutdown may clear it
        return chosen.skmsg if chosen is not None else None

    def _read_skmsg_counts(self) -> None:
        """Export the sk_msg program's outcome counters (a BPF array) as self-metrics, by delta."""
        sk = self._skmsg()
        if sk is None:
            return
        try:
            counts = sk.counts()
        except Exception:  # our bug or a map gone at shutdown: metrics only
            self.telemetry.warn_once_per("skmsg-counts", 60, "cannot read the sk_msg counters")
            return
        for name, delta in self._skmsg_deltas("request", counts.outcomes):
            if name == "injected":
                self.m_tp_injected.inc(delta)
            else:
                self.m_tp_skipped.labels(reason=name).inc(delta)
        for name, delta in self._skmsg_deltas("connection", counts.sockets_skipped):
            self.m_tp_sockets_skipped.labels(reason=name).inc(delta)
            if name == "held_elsewhere":
                self.telemetry.warn_once_per("skmsg-held", 600, "sk_msg propagation: %s; %d more client "
                                             "connections sent unchanged (their spans are joined by stitching)",
                                             HELD_ELSEWHERE_HINT, delta)

    def _skmsg_deltas(self, kind: str, counts: dict[str, int]) -> list[tuple[str, int]]:
        """(name, increase since the last read) of the sk_msg counters that grew."""
        grown = []
        for name, value in counts.items():
            delta = value - self._skmsg_seen.get(f"{kind}:{name}", 0)
            if delta > 0:
                self._skmsg_seen[f"{kind}:{name}"] = value
                grown.append((name, delta))
        return grown

    def _drain(self, tb: TracedBinary, final: bool = False) -> int:
        """Push one batch per probe of this binary: the records the copier holds, then those still in
        the ring buffer; returns the records read. `final`: the copier lets go of the ring buffers
        too (before they are closed). Called with self._lock held; the batches wait in the outbox
        (`_send_outbox` after the lock is released)."""
        n = 0
        copier = self.copier
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
                self.m_lost.inc(lost - pp.lost_seen)
                self.telemetry.warn_once_per("lost", 60, "ring buffer full: %d %s records lost so far "
                                             "(ring_buffer_size)", lost, pp.probe.name)
                pp.lost_seen = lost
            if not records:
                continue
            self.m_events.inc(len(records))
            try:
                spans = pp.probe.spans(records, pp.state, tb.binary, self.mono_to_unix, pp.build)
            except Exception:  # our bug: keep reading
                self.telemetry.warn_once_per(f"decode-{pp.probe.name}", 60, "%s: cannot decode records",
                                             pp.probe.name)
                continue
            self._count_writer_outcomes(getattr(pp.state, "outcomes", None))
            self._push(spans, pp.probe.scope, getattr(pp.state, "injected", ()))
        return n

    def _count_writer_outcomes(self, outcomes: dict[str, int] | None) -> None:
        """probe_write mode: the writer's outcome is in each client record (there is no sk_msg array)."""
        for name, n in (outcomes or {}).items():
            if name == "injected":
                self.m_tp_injected.inc(n)
            else:
                self.m_tp_skipped.labels(reason=name).inc(n)

    def _push(self, spans: list[tuple[int, Span]], scope_name: str, settled: Collection[bytes] = ()) -> None:
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
            batch = self.stitcher.process(batch, settled)
        self._outbox.append(batch)

    def _send_outbox(self) -> None:
        """Push what drains decoded; call without self._lock (the next consumer may block)."""
        with self._lock:
            batches, self._outbox = self._outbox, []
        for batch in batches:
            self._consume(batch)

    def _consume(self, batch: SpanBatch) -> None:
        n = sum(len(ss.spans) for rs in batch.resource_spans for ss in rs.scope_spans)
        if n == 0:
            return
        try:
            self.next_consumer.consume(batch)
            self.m_accepted.inc(n)
        except ConsumerError as e:
            self.m_refused.inc(n)
            self.telemetry.warn_once_per("refused", 10, "next consumer refused %d spans: %s", n, e)


def _create(id: ComponentID, config: EbpfGoConfig, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> EbpfGoReceiver:
    return EbpfGoReceiver(id, config, telemetry, next_consumer)


factory = Factory(
    type="ebpf_go",
    kind=Kind.RECEIVER,
    config_model=EbpfGoConfig,
    create=_create,
    stability="development",
    description="Traces Go programs on this host with eBPF uprobes (net/http server and client, database/sql, gRPC server and client spans), without touching them.",
)
