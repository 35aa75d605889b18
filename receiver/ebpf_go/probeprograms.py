"""A Go binary's probe programs: for each probe present in it, the flags from its layout, the image
(images.ImageStore: memory, disk, or a compiler child), the maps loaded, the ring buffer bound to the
probe's collector. Every image is asked for before any is waited for, so the compiles of one binary
run in parallel; the client probe comes last, as its program depends on the propagation mode, which
may still be being chosen. A probe that fails is reported and left off; the others run.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from collector.errors import UserError
from collector.telemetry import ComponentLogger

from . import discovery
from .bpfprogram import load_program, pin_dir_of
from .gobinary import GoBinary
from .images import CompileResult, ImageStore
from .probes import Build, Probe, ctx_readers, g_spans_needed
from .probes.spec import RINGBUF
from .receiver_metrics import ReceiverMetrics
from .traced import ProbeProgram

ORIGIN_LOG = {"compiled": "compiled", "memory": "reused the image of another binary",
              "disk": "loaded from the image cache"}


@dataclass
class ProgramBuilder:
    """Builds the probe programs of one binary at a time (the discovery thread's).

    `common`: what every program is compiled with; the propagation chooser sets its propagation
    flags before it sets `propagation_chosen`."""

    images: ImageStore
    kernel_source: str | None
    common: Build
    propagation_chosen: threading.Event
    metrics: ReceiverMetrics
    log: ComponentLogger

    def build(self, gb: GoBinary, wanted: list[Probe], p: discovery.ProcInfo) -> list[ProbeProgram]:
        """The programs of the probes in `wanted` that compile and load (p: the process that asked)."""
        programs: list[ProbeProgram] = []
        pending: list[tuple[Probe, Future[CompileResult], list[str], Build]] = []
        readers, g_spans = ctx_readers(wanted), g_spans_needed(wanted)
        # The client probe last: its program depends on the propagation mode, which may still be chosen.
        for pr in sorted(wanted, key=lambda pr: pr.uses_propagation):
            if pr.uses_propagation:
                self.propagation_chosen.wait()
            try:
                build = dataclasses.replace(self.common, ctx_readers=readers, g_spans=g_spans)
                for note in pr.notes(gb, build):
                    self.log.warning("%s: %s", p.exe, note, extra={"pid": p.pid, "exe": p.exe})
                flags = pr.cflags(gb, build)
                pending.append((pr, self.images.submit(pr.source, flags, self.kernel_source), flags, build))
            except Exception as e:  # ProbeUnavailable (an offset or a function missing), or our bug: this probe is off
                self._probe_off(pr, p, e)
        for pr, fut, flags, build in pending:
            try:
                result = fut.result()
                prog = load_program(result, pin_dir_of(flags))
                col = pr.collector()
                col.bind(prog.bpf.ring_buffer(RINGBUF))
            except Exception as e:  # KernelError (compile, map creation): this probe is off
                self._probe_off(pr, p, e)
                continue
            self.metrics.compiles.labels(origin=result.origin).inc()
            programs.append(ProbeProgram(pr, prog, col, pr.binary_state(gb, build), build))
            self.log.info("%s program for %s (%s): %s in %.2fs", pr.name, p.exe, gb.go_version,
                          ORIGIN_LOG[result.origin], prog.compile_seconds, extra={"pid": p.pid, "exe": p.exe})
        return programs

    def _probe_off(self, pr: Probe, p: discovery.ProcInfo, e: Exception) -> None:
        self.metrics.errors.labels(reason="compile" if isinstance(e, UserError) else "unsupported").inc()
        if isinstance(e, UserError):
            self.metrics.compiles.labels(origin="error").inc()
        self.log.warning("%s probe off for %s: %s", pr.name, p.exe, e, extra={"pid": p.pid, "exe": p.exe})
