"""The `ebpf_go` receiver's self-metrics (Prometheus, localhost:8888/metrics): processes and uprobes
traced, records read and lost, what was not traced and why, BPF programs prepared by origin, the
stitcher's outcomes, and the propagation counters.

In sk_msg mode the propagation counters live in a BPF array that the sk_msg program fills; they
are read once a second (`read_skmsg_counts`) and exported by delta. In probe_write mode each client
record carries the writer's outcome (`count_writer_outcomes`, from the drain).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from collector.component import ComponentID
from collector.telemetry import ComponentTelemetry

from .propagation import SkMsgPropagation
from .propagation.skmsg import HELD_ELSEWHERE_HINT

if TYPE_CHECKING:
    from .traced import TracedBinary


FUNCTION_DROP_REASONS = {"dropped_rate": "rate_limit", "dropped_short": "min_duration", "dropped_depth": "depth"}


class ReceiverMetrics:
    """The receiver's counters and gauges, registered once per receiver."""

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry) -> None:
        self.telemetry = telemetry
        m = telemetry.metrics
        self.processes = m.gauge("otelgo_ebpf_processes_instrumented", "Processes with probes attached.")
        self.probes = m.gauge("otelgo_ebpf_probes_attached", "Uprobes attached, per probe.", ["probe"])
        self.events = m.counter("otelgo_ebpf_events", "Ring-buffer records read.")
        self.lost = m.counter("otelgo_ebpf_events_lost", "Records dropped in BPF: ring buffer full.")
        self.sampler = m.counter("otelgo_ebpf_sampler_spans", "Spans by the head sampler's decision (sampler): "
                                 "sampled ones became records, unsampled ones were counted in BPF and dropped.",
                                 ["probe", "decision"])
        self.errors = m.counter("otelgo_ebpf_attach_errors", "Processes or probes not traced, by reason.",
                                ["reason"])
        self.tp_injected = m.counter("otelgo_ebpf_propagation_injected",
                                     "Requests whose traceparent sk_msg inserted at the socket.")
        self.tp_skipped = m.counter("otelgo_ebpf_propagation_skipped",
                                    "Requests sk_msg left unchanged, by reason.", ["reason"])
        self.tp_sockets_skipped = m.counter(
            "otelgo_ebpf_propagation_connections_skipped",
            "Client connections sk_msg cannot watch, by reason (held_elsewhere: another sk_msg program "
            "holds them; not_added: map full or other): their requests are sent unchanged.", ["reason"])
        self.stitch = m.counter("otelgo_ebpf_stitch", "Local server spans the stitcher handled, by outcome and "
                                "protocol (http/1.1: by connection and time; grpc: by connection and stream id).",
                                ["outcome", "protocol"])
        self.compiles = m.counter("otelgo_ebpf_bpf_programs",
                                  "BPF programs prepared, by origin: compiled (a compiler child ran), "
                                  "memory or disk (image cache), error.", ["origin"])
        self.accepted = m.receiver_accepted.labels(receiver=str(id), transport="ebpf")
        self.refused = m.receiver_refused.labels(receiver=str(id), transport="ebpf")
        # function spans (probes/functions): what the BPF counts per function, by delta
        self.function_calls = m.counter("otelgo_ebpf_function_calls", "Calls of a traced function seen.", ["function"])
        self.function_spans = m.counter("otelgo_ebpf_function_spans", "Spans of a traced function sent.", ["function"])
        self.function_dropped = m.counter(
            "otelgo_ebpf_function_spans_dropped", "Calls of a traced function without a span, by reason "
            "(rate_limit: over max_spans_per_second; min_duration: shorter; depth: too deeply nested).",
            ["function", "reason"])
        self.skmsg_seen: dict[str, int] = {}   # "<kind>:<name>" -> the sk_msg counter's last value

    def count_stitch(self, outcome: str, n: int, protocol: str) -> None:
        """The stitcher's outcome counts."""
        self.stitch.labels(outcome=outcome, protocol=protocol).inc(n)

    def read_probe_counters(self, binaries: Iterable[TracedBinary]) -> None:
        """The counters probes keep in BPF (function spans' per function), with the receiver's lock held."""
        for tb in binaries:
            for pp in tb.programs:
                try:
                    grown = pp.probe.read_counters(pp.program.bpf, pp.state)
                except Exception:  # our bug or a map gone: metrics only
                    self.telemetry.warn_once_per(f"counters-{pp.probe.name}", 60, "cannot read the %s counters",
                                                 pp.probe.name)
                    continue
                for subject, name, delta in grown:
                    if name == "calls":
                        self.function_calls.labels(function=subject).inc(delta)
                    elif name == "spans":
                        self.function_spans.labels(function=subject).inc(delta)
                    else:
                        self.function_dropped.labels(function=subject, reason=FUNCTION_DROP_REASONS[name]).inc(delta)

    def count_writer_outcomes(self, outcomes: dict[str, int] | None) -> None:
        """probe_write mode: the writer's outcome is in each client record (there is no sk_msg array)."""
        for name, n in (outcomes or {}).items():
            if name == "injected":
                self.tp_injected.inc(n)
            else:
                self.tp_skipped.labels(reason=name).inc(n)

    def read_skmsg_counts(self, sk: SkMsgPropagation | None) -> None:
        """Export the sk_msg program's outcome counters (a BPF array) as self-metrics, by delta."""
        if sk is None:
            return
        try:
            counts = sk.counts()
        except Exception:  # our bug or a map gone at shutdown: metrics only
            self.telemetry.warn_once_per("skmsg-counts", 60, "cannot read the sk_msg counters")
            return
        for name, delta in self._skmsg_deltas("request", counts.outcomes):
            if name == "injected":
                self.tp_injected.inc(delta)
            else:
                self.tp_skipped.labels(reason=name).inc(delta)
        for name, delta in self._skmsg_deltas("connection", counts.sockets_skipped):
            self.tp_sockets_skipped.labels(reason=name).inc(delta)
            if name == "held_elsewhere":
                self.telemetry.warn_once_per("skmsg-held", 600, "sk_msg propagation: %s; %d more client "
                                             "connections sent unchanged (their spans are joined by stitching)",
                                             HELD_ELSEWHERE_HINT, delta)

    def _skmsg_deltas(self, kind: str, counts: dict[str, int]) -> list[tuple[str, int]]:
        """(name, increase since the last read) of the sk_msg counters that grew."""
        grown = []
        for name, value in counts.items():
            delta = value - self.skmsg_seen.get(f"{kind}:{name}", 0)
            if delta > 0:
                self.skmsg_seen[f"{kind}:{name}"] = value
                grown.append((name, delta))
        return grown
