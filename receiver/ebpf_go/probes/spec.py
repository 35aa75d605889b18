"""The seam between the receiver and an instrumented library: what a probe declares, and the one
path that turns a declaration into compile flags and attached uprobes.

A probe is a package `probes/<library>/` holding its BPF C, its declaration (a `Probe` subclass
instance named `PROBE`: hooks, offsets, record, context role) and its span building. The registry
(`probes/__init__.py`) lists them; the receiver, `inspect` and the `instrumentations` options read it.

| declared              | read by                                                              |
|-----------------------|----------------------------------------------------------------------|
| `hooks`               | `present` (does the binary link the library), `attach_points`, inspect |
| `offsets`             | `cflags` (-D<CONST>=<offset>, DWARF > table > fallback), inspect      |
| `record`              | `cflags` (-DRECORD_ASSERTS: the C struct checked field by field),     |
|                       | `collector` (one precompiled struct.Struct, decoded in place)         |
| `goroutine_spans`     | Build.g_spans: the servers fill g_spans (bpf/ctx_spans.h) for it      |
| `context`             | "writes": its spans are parents found through `ctx_spans`; "reads":   |
|                       | it looks parents up there (bpf/ctx_spans.h). A writer fills the map   |
|                       | only when a reader is attached to the same binary (Build.ctx_readers) |

Every program emits into the ring buffer `events` and counts drops in `lost` (bpf/record.h).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from collector.spans import Span

from ..gobinary import GoBinary
from ..ringbuf import RingBuffer, split_block, unpack_block

BPF_INCLUDE = Path(__file__).resolve().parents[1] / "bpf"   # shared headers: go_types.h, ctx_spans.h, record.h
RINGBUF, LOST_MAP, UNSAMPLED_MAP = "events", "lost", "unsampled"   # bpf/record.h
CTX_WALK_MAX = 16        # contexts walked up from a call's ctx to find a parent (bpf/ctx_spans.h)
WAKEUP_EVERY = 32        # every n-th record wakes the reader (bpf/record.h)


class ProbeUnavailable(RuntimeError):
    """This binary lacks something a probe needs (the message says what): that probe stays off for
    the binary, the others run. Raised by every probe, caught by type."""


@dataclass(frozen=True)
class Offset:
    """A struct field offset the C needs as `-D<const>=<offset>`."""

    const: str
    struct: str          # Go type, e.g. net/http.Request
    field: str
    fallback: int | None  # when neither DWARF nor the bundled table knows it; None: the probe is off
    strict: bool = False  # a table guess only from the same minor release or agreeing neighbours, else off


@dataclass(frozen=True)
class Hook:
    """A Go function the probe hooks: `entry` at the cheap entry point (the jcc after the stack
    check, else offset 0), `returns` at every RET."""

    symbol: str
    entry: str | None
    returns: str | None = None
    required: bool = False    # the library is "present" only with it; else hooked when present
    when: str | None = None   # attach only when this Build flag is true (e.g. "probe_write")


@dataclass(frozen=True)
class Field:
    """One field of a ring-buffer record: its C designator (`h.tgid`, `path`) and struct format;
    `c` None for padding (no value, no check)."""

    c: str | None
    fmt: str


# struct event_header (bpf/record.h): every record starts with it.
HEADER = (Field("h.kind", "I"), Field("h.tgid", "I"), Field("h.start_ns", "Q"), Field("h.end_ns", "Q"),
          Field("h.goroutine", "Q"))
# struct trace_ctx (bpf/go_types.h), when a record embeds it as `tc`.
TRACE_CTX = (Field("tc.trace_id", "16s"), Field("tc.span_id", "8s"), Field("tc.parent_span_id", "8s"),
             Field("tc.flags", "B"), Field("tc.remote_parent", "B"), Field(None, "6x"))


@dataclass(frozen=True)
class Record:
    """A ring-buffer record's layout, declared once: the decoder is built from it and the C struct
    is checked against it at compile time (`asserts`), offset and size of every field."""

    c_struct: str
    fields: tuple[Field, ...]
    tail: str | None = None   # a variable-length last field (sent cut to its length): only its offset is checked
    layout: struct.Struct = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", struct.Struct("<" + "".join(f.fmt for f in self.fields)))

    @property
    def size(self) -> int:
        return self.layout.size

    def offsets(self) -> list[tuple[str, int, int]]:
        """(C designator, offset, size) of every named field."""
        out, pos = [], 0
        for f in self.fields:
            n = struct.calcsize("<" + f.fmt)
            if f.c is not None:
                out.append((f.c, pos, n))
            pos += n
        return out

    def asserts(self) -> str:
        """C `_Static_assert`s of the layout, for -DRECORD_ASSERTS (bpf/record.h)."""
        s = f"struct {self.c_struct}"
        checks = [f'_Static_assert(__builtin_offsetof({s}, {c}) == {off} && sizeof((({s} *)0)->{c}) == {n}, '
                  f'"{self.c_struct}.{c}: offset {off} size {n} in the Python declaration");'
                  for c, off, n in self.offsets()]
        if self.tail is None:
            checks.append(f'_Static_assert(sizeof({s}) == {self.size}, "{self.c_struct}: size {self.size}");')
        else:
            checks.append(f'_Static_assert(__builtin_offsetof({s}, {self.tail}) == {self.size}, '
                          f'"{self.c_struct}.{self.tail}: offset {self.size}");')
        return " ".join(checks)


@dataclass
class Build:
    """What one probe's program is built and attached with, for one binary."""

    pin_dir: str
    max_inflight: int
    ringbuf_pages: int
    skmsg: bool = False          # propagation sk_msg: the client probe hands traceparents to sk_msg
    probe_write: bool = False    # propagation probe_write: the client probe writes them itself
    ctx_readers: bool = True     # a probe that reads ctx_spans is attached to this binary
    g_spans: bool = False        # a probe that needs g_spans (function spans) is attached to this binary
    sampler: tuple[str, ...] = ()  # head sampling's -D flags (sampler.py), the same for every probe
    options: dict[str, Any] = field(default_factory=dict)   # per-probe options, by probe name


class RawCollector:
    """Reads one ring buffer and keeps each record's bytes (for probes whose decode takes bytes)."""

    def __init__(self) -> None:
        self.ring: RingBuffer | None = None

    def bind(self, ring: RingBuffer) -> None:
        self.ring = ring

    def take(self) -> list[Any]:
        """The records committed since the last call, as one batch."""
        return self.ring.read() if self.ring is not None else []

    def decode(self, blocks: list[bytes]) -> list[Any]:
        """The records in blocks of `RingBuffer.read_block` (the receiver's copier), as `take` gives them."""
        return [r for block in blocks for r in split_block(block)]


class StructCollector(RawCollector):
    """Decodes each record in place with one precompiled Struct (no copy of the record)."""

    def __init__(self, layout: struct.Struct) -> None:
        super().__init__()
        self.layout = layout
        self.short = 0

    def take(self) -> list[Any]:
        if self.ring is None:
            return []
        records, short = self.ring.read_unpacked(self.layout)
        self.short += short
        return records

    def decode(self, blocks: list[bytes]) -> list[Any]:
        out: list[Any] = []
        for block in blocks:
            records, short = unpack_block(block, self.layout)
            self.short += short
            out.extend(records)
        return out


def offset_flags(binary: GoBinary, offsets: tuple[Offset, ...] | list[Offset]) -> dict[str, int]:
    """const -> offset for this binary; ProbeUnavailable naming the first field nobody knows."""
    out = {}
    for o in offsets:
        off = binary.struct_offset(o.struct, o.field)
        if off is not None and o.strict and not off.agreed:
            raise ProbeUnavailable(f"no measured offset for {o.struct}.{o.field}: {off.detail}, and layouts "
                                   "change between those releases (a build with DWARF is traced)")
        value = off.value if off is not None else o.fallback
        if value is None:
            raise ProbeUnavailable(f"no offset for {o.struct}.{o.field} (no DWARF and not in the offsets table)")
        out[o.const] = value
    return out


def include_flags(probe: Probe) -> list[str]:
    """-I flags for compiling a probe's C outside the loader (tests, benchmarks: BCC in-process)."""
    return [f"-I{BPF_INCLUDE}", f"-I{probe.source.parent}"]


class Probe:
    """One instrumented library. Subclasses set the class attributes and override `constants`,
    `extra_points` and `spans`; everything else is the generic path."""

    name: ClassVar[str]          # its key under `instrumentations:`
    title: ClassVar[str]         # how `inspect` and the logs name it, e.g. "net/http server"
    scope: ClassVar[str]         # instrumentation scope name, after "otelgo-collector/"
    source: ClassVar[Path]       # its BPF C file, in its package
    hooks: ClassVar[tuple[Hook, ...]]
    offsets: ClassVar[tuple[Offset, ...]] = ()
    record: ClassVar[Record]
    context: ClassVar[Literal["writes", "reads", "none"]] = "none"
    from_config: ClassVar[str] = ""   # its targets come from the config: why it is off without them (inspect)
    goroutine_spans: ClassVar[bool] = False    # needs g_spans filled by the servers (Build.g_spans, ctx_spans.h)
    uses_propagation: ClassVar[bool] = False   # its program depends on the propagation mode (Build.skmsg/probe_write)
    decode_in_place: ClassVar[bool] = True     # records decoded by `record.layout` (else raw bytes)

    # -- options

    def options_from(self, receiver_config: Any) -> Any:
        """This probe's options, from the ebpf_go receiver's config (None: it has none)."""
        return None

    # -- what is in the binary

    def present(self, gb: GoBinary) -> bool:
        """The library is linked: every required hook, else at least one hook, exists."""
        required = [h for h in self.hooks if h.required]
        if required:
            return all(gb.function(h.symbol) is not None for h in required)
        return any(gb.function(h.symbol) is not None for h in self.hooks)

    def wanted(self, gb: GoBinary, build: Build) -> bool:
        """Whether the receiver attaches this probe to the binary: `present`, unless the probe's
        targets come from the config (function spans)."""
        return self.present(gb)

    def notes(self, gb: GoBinary, build: Build) -> list[str]:
        """Warnings about this binary for the log, once (e.g. a configured function not traced, and why)."""
        return []

    # -- compile

    def binary_offsets(self, gb: GoBinary) -> tuple[Offset, ...]:
        """The offsets this binary's program needs: `offsets`, plus those of its library version."""
        return self.offsets

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        """The probe's own -D flags beyond its offsets and the common ones."""
        return []

    def cflags(self, gb: GoBinary, build: Build) -> list[str]:
        """Every -D constant of the probe's C for this binary. ProbeUnavailable when one is missing."""
        if gb.arch != "amd64":
            raise ProbeUnavailable(f"only amd64 is supported (binary is {gb.arch})")
        if gb.go_version_tuple < (1, 17, 0):
            raise ProbeUnavailable(f"{gb.go_version} predates the register ABI (Go >= 1.17 needed)")
        flags = [f"-D{c}={v}" for c, v in offset_flags(gb, self.binary_offsets(gb)).items()]
        flags += self.constants(gb, build)
        flags += [f'-DPIN_DIR="{build.pin_dir}"', f"-DMAX_INFLIGHT={build.max_inflight}",
                  f"-DRINGBUF_PAGES={build.ringbuf_pages}", f"-DWAKEUP_EVERY={WAKEUP_EVERY}",
                  f"-DCTX_WALK_MAX={CTX_WALK_MAX}", f"-DCTX_SPANS={1 if build.ctx_readers else 0}",
                  f"-DG_SPANS={1 if build.g_spans else 0}", *build.sampler,
                  f"-DRECORD_ASSERTS={self.record.asserts()}"]
        return flags

    # -- attach

    def extra_points(self, gb: GoBinary, build: Build) -> list[tuple[int, str]]:
        """Probe points beyond the hooks' entries and RETs (e.g. the server's span end points)."""
        return []

    def attach_points(self, gb: GoBinary, build: Build) -> list[tuple[int, str]]:
        """[(address, BPF function)] for this binary: every hook present (and wanted by `build`)."""
        points: list[tuple[int, str]] = []
        for h in self.hooks:
            if h.when is not None and not getattr(build, h.when):
                continue
            if gb.function(h.symbol) is None:
                if h.required or h.when is not None:
                    raise ProbeUnavailable(f"{h.symbol} not in the binary")
                continue
            if h.entry is not None:
                points.append((gb.entry_probe(h.symbol).addr, h.entry))
            if h.returns is not None:
                points += [(a, h.returns) for a in gb.return_sites(h.symbol)]
        return points + self.extra_points(gb, build)

    def attach(self, bpf: Any, gb: GoBinary, path: str, pid: int, build: Build) -> list[tuple[int, str]]:
        """Attach every point to `pid` (-1: every process of the binary); the points attached."""
        points = self.attach_points(gb, build)
        if not points:
            raise ProbeUnavailable(f"nothing to attach for {self.name}")
        for addr, fn in points:
            bpf.attach_uprobe(name=path.encode() if isinstance(path, str) else path, addr=addr,
                              fn_name=fn.encode(), pid=pid)
        return points

    def report(self, gb: GoBinary) -> dict[str, Any]:
        """What `inspect` shows of this probe beyond hooks and offsets (e.g. where a span ends)."""
        return {}

    # -- records to spans

    def read_counters(self, bpf: Any, state: Any) -> list[tuple[str, str, int]]:
        """Counters the program keeps in BPF, as (subject, counter, increase since the last read)."""
        return []

    def collector(self) -> RawCollector:
        return StructCollector(self.record.layout) if self.decode_in_place else RawCollector()

    def binary_state(self, gb: GoBinary, build: Build) -> Any:
        """Per-binary data the span builder needs (computed once)."""
        return None

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        raise NotImplementedError
