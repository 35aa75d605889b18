"""What the `ebpf_go` receiver traces: `TracedBinary`, one executable (device, inode) with its probe
programs (`ProbeProgram`) and its traced pids, and `ProcessState`, one traced process with its
resource. The tracker (tracker.py) fills them; the drain (drain.py) reads them under the
receiver's lock.

`process_resource` builds a process's resource attributes (DESIGN.md §5): service.name from the
target, else the process's own OTEL_SERVICE_NAME, else the executable's name; the host's, its owner
and its container and pod from identity.py; the target's `attributes` last (they win).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from collector.spans import Resource

from . import discovery, identity
from .bpfprogram import Program
from .gobinary import GoBinary
from .probes import Build, Probe, RawCollector

DISTRO = "otelgo-collector"
VERSION = "0.1.0"


@dataclass
class ProbeProgram:
    """One probe's program for one binary."""

    probe: Probe
    program: Program
    collector: RawCollector
    state: Any
    build: Build         # what the program was compiled with: attach and spans use the same
    lost_seen: int = 0
    unsampled_seen: int = 0


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


def process_resource(p: discovery.ProcInfo, gb: GoBinary, sel: discovery.Selector,
                     host: dict[str, Any]) -> Resource:
    service = sel.service_name or discovery.read_environ(p.pid, "OTEL_SERVICE_NAME") or os.path.basename(p.exe)
    attrs: dict[str, Any] = {
        "service.name": service,
        "process.pid": p.pid,
        "process.executable.path": p.exe,
        "process.runtime.name": "go",
        "process.runtime.version": gb.go_version,
        **host,
        **identity.process_attributes(p.pid),
        "telemetry.distro.name": DISTRO,
        "telemetry.distro.version": VERSION,
    }
    attrs.update(sel.attributes)
    return Resource(attrs)
