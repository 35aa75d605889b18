"""The `ebpf_go` receiver: traces Go programs on this host with eBPF uprobes, untouched.

The receiver's lifecycle and its factory. `start` checks what it cannot run without (preflight.py),
prepares its pin directory (pins.py), opens the image store (images.py) and starts its threads:
the propagation chooser, the ring copier and reader (drain.py), discovery (tracker.py). `shutdown`
stops them, drains what is left and detaches everything. The config: config.py; the self-metrics:
receiver_metrics.py. How it works and every option: receiver/ebpf_go/README.md.
"""

from __future__ import annotations

import threading

from collector.component import ComponentID, Consumer, Factory, Host, Kind, Receiver
from collector.telemetry import ComponentTelemetry

from . import hostfs, pins, preflight, propagation
from .commands import COMMANDS
from .config import EbpfGoConfig, probe_options
from .drain import SpanDrain
from .images import ImageStore
from .probeprograms import ProgramBuilder
from .probes import PROBES, Build
from .propagation.stitch import Stitcher
from .receiver_metrics import ReceiverMetrics
from .sampler import sampler_flags
from .traced import ProcessState, TracedBinary
from .tracker import ProcessTracker

STITCH_WINDOW_S = 2.0        # how long a stitch candidate waits for its other side and the next hop
STITCH_MAX_PENDING = 20000   # candidates held at most (the oldest leave unchanged beyond)
COMPILE_PARALLEL = 2         # BPF compiler children at once (each ~1.5 s of one core)
CHOOSER_JOIN_S = 60.0        # how long shutdown waits for the propagation chooser (see shutdown)


class EbpfGoReceiver(Receiver):
    def __init__(self, id: ComponentID, config: EbpfGoConfig, telemetry: ComponentTelemetry,
                 next_consumer: Consumer) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.config = config
        self.log = telemetry.logger
        self.metrics = ReceiverMetrics(id, telemetry)
        self.kernel_source: str | None = None
        self.pin_dir = pins.pin_dir_for(id)
        self._lock = threading.Lock()     # binaries/programs: discovery thread vs reader thread
        self.binaries: dict[tuple[int, int], TracedBinary] = {}
        self.processes: dict[int, ProcessState] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._propagation_chosen = threading.Event()   # set once self.propagation and common.skmsg are final
        self._propagation_lock = threading.Lock()      # self.propagation: the chooser vs shutdown
        self._chooser: threading.Thread | None = None
        self.enabled = False
        self.common = Build(self.pin_dir, config.max_inflight_calls, config.ring_buffer_size // 4096)
        self.propagation: propagation.PropagationChoice | None = None
        self.probes = [p for p in PROBES if getattr(config.instrumentations, p.name, False)]
        self.images: ImageStore | None = None
        self.drain = SpanDrain(self._lock, self.binaries, self.processes, self.metrics, telemetry, next_consumer,
                               config.ring_buffer_size)
        self.tracker = ProcessTracker(config, self.probes, self.binaries, self.processes, self._lock, self.drain,
                                      self.metrics, telemetry, self._stop, self._skmsg)

    # -------------------------------------------------------- lifecycle

    def start(self, host: Host) -> None:
        # What the receiver cannot do without (BCC, privileges, headers, bpffs) fails the collector's
        # start, as in the Go collector: a collector that runs but traces nothing misleads its user.
        preflight.check_bcc()
        preflight.check_privileges()
        self.kernel_source, how = preflight.find_kernel_headers(self.config.kernel_headers)
        pins.prepare_pin_dir(self.pin_dir, self.log)
        self._report_lockdown()
        self.common = Build(self.pin_dir, self.config.max_inflight_calls, self.config.ring_buffer_size // 4096,
                            options=probe_options(self.config), sampler=tuple(sampler_flags(self.config.sampler)))
        images = self.images = ImageStore(self.config.bpf_cache_dir or None, parallel=COMPILE_PARALLEL,
                                          log=self.log)
        self.tracker.builder = ProgramBuilder(images, self.kernel_source, self.common, self._propagation_chosen,
                                              self.metrics, self.log)
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
                      "every Go process" if not self.tracker.selectors
                      else f"{len(self.tracker.selectors)} target selector(s)")
        self.drain.copier.start(f"{self.id}-copier")
        reader = lambda: self.drain.run(self._stop, self._read_counts)  # noqa: E731
        for name, fn in (("discovery", self.tracker.run), ("reader", reader)):
            t = threading.Thread(target=fn, name=f"{self.id}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _report_lockdown(self) -> None:
        """The kernel lockdown mode, told to the operator once (securityfs mounted to read it)."""
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
                    self.drain.stitcher = Stitcher(window_s=STITCH_WINDOW_S, max_pending=STITCH_MAX_PENDING,
                                                   count=self.metrics.count_stitch)
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
        self.drain.copier.stop(timeout)   # wakes the reader too
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
            self.drain.drain_final()
            self.metrics.read_probe_counters(self.binaries.values())
            self.tracker.close_all()
        self.drain.send_outbox()
        self.metrics.processes.set(0)
        with self._propagation_lock:
            chosen = self.propagation
            if chosen is not None:
                self._read_skmsg_counts()
                self.propagation = None
        if chosen is not None:
            chosen.stop()
        pins.remove_pin_dir(self.pin_dir)

    def _skmsg(self) -> propagation.SkMsgPropagation | None:
        """The sk_msg propagation in use, if that is the mode."""
        chosen = self.propagation   # read once: shutdown may clear it
        return chosen.skmsg if chosen is not None else None

    def _read_skmsg_counts(self) -> None:
        self.metrics.read_skmsg_counts(self._skmsg())

    def _read_counts(self) -> None:
        """Once a second, on the reader thread: the counters kept in BPF maps, as self-metrics."""
        self._read_skmsg_counts()
        with self._lock:
            self.metrics.read_probe_counters(self.binaries.values())


def _create(id: ComponentID, config: EbpfGoConfig, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> EbpfGoReceiver:
    return EbpfGoReceiver(id, config, telemetry, next_consumer)


factory = Factory(
    type="ebpf_go",
    kind=Kind.RECEIVER,
    config_model=EbpfGoConfig,
    create=_create,
    stability="development",
    description="Traces Go programs on this host with eBPF uprobes (net/http server and client, database/sql, gRPC server and client spans; gin, echo, chi and gorilla/mux routes; spans of the functions a user names), without touching them.",
    commands=COMMANDS,
)
