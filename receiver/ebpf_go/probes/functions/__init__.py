"""Function spans: an INTERNAL span per call of the Go functions a user names, untouched.

    receivers:
      ebpf_go:
        functions:
          - symbol: main.lookupItem
          - symbol: "github.com/acme/shop/internal/store.(*Store).*"
            min_duration: 1ms            # shorter calls dropped in BPF
            attributes: {component: store}
        max_functions: 64

BPF side: functions.c beside this file (how a call's entry and RET meet, where the parent comes
from, the rate limit). Here: which functions of a binary a config names (`expand`), the programs and
points to attach, and the spans.

A `symbol` is a Go symbol as the binary's function table (pclntab) names it, so stripped binaries are
traced alike. `*` and `?` are globs (`*` also crosses `/` and `.`); `(*T)` is a pointer receiver, not a
glob; a glob leaves out what the compiler generates (closures `f.func1`, `deferwrap`, `gowrap`, method
values `-fm`). A generic function is named without its type arguments (`main.Max` or `main.Max[...]`: every
instance). What is not traced gets one warning with the reason: not in the binary, inlined into
every caller, no RET, the Go runtime, or beyond `max_functions`.

Span: name the symbol without its package path (`store.(*Store).Get`, as Go's stack traces print
it), kind INTERNAL; `code.function.name` the full symbol (semantic conventions v1.37: the package
path is part of it, `code.namespace` is gone); the entry's `attributes`; Error with the message
"panic" when the call ended in runtime.gopanic.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.spans import KIND_INTERNAL, STATUS_ERROR, AttrValue, Span

from ...gobinary import Function, GoBinary
from ...gobinary.callers import Callers
from ...gobinary.disasm import is_emulated
from ..spec import HEADER, TRACE_CTX, Build, Field, Hook, Probe, ProbeUnavailable, Record

BPF_SOURCE = Path(__file__).resolve().with_name("functions.c")
SCOPE_NAME = "function"
PANIC_HOOK = "runtime.gopanic"
FN_GOROUTINES_MAX = 4096      # goroutines inside traced calls at once: ~1.2 KiB of kernel memory each
DEFAULT_RATE = 10_000         # spans per second per function
# Packages whose functions are refused: the runtime runs on system stacks and inside our own hooks
# (gopanic), and its hot paths (malloc, scheduling) would make every program slower.
REFUSED_PREFIXES = ("runtime.", "runtime/", "internal/runtime/", "internal/abi.", "sync/atomic.")


@dataclass(frozen=True)
class FunctionSpec:
    """One entry of `functions:`."""

    symbol: str
    min_duration_ns: int = 0
    attributes: tuple[tuple[str, AttrValue], ...] = ()
    max_spans_per_second: int = DEFAULT_RATE


@dataclass(frozen=True)
class Options:
    functions: tuple[FunctionSpec, ...] = ()
    max_functions: int = 64


@dataclass(frozen=True)
class Target:
    """A function of one binary that gets spans, with its FN_TABLE id (its index)."""

    symbol: str       # as the binary names it
    start: int        # its address (the instances of a generic function share a pclntab name)
    full: str         # code.function.name: type arguments as Go prints them, `[...]`
    name: str         # the span name: `full` without the package path
    spec: FunctionSpec


@dataclass(frozen=True)
class Expansion:
    targets: tuple[Target, ...]
    skipped: tuple[tuple[str, str], ...]    # (symbol or pattern, why not traced)


def printed_name(symbol: str) -> str:
    """A symbol with its type arguments as Go prints them: `main.Max[go.shape.int]` -> `main.Max[...]`."""
    out, depth = [], 0
    for ch in symbol:
        if ch == "[":
            if depth == 0:
                out.append("[...")
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0:
                out.append("]")
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def short_name(full: str) -> str:
    """Without the package path, as Go's tracebacks print it: `github.com/a/b/store.(*S).Get` -> `store.(*S).Get`."""
    head = full.split("[", 1)[0]
    slash = head.rfind("/")
    return full[slash + 1:] if slash >= 0 else full


def _pattern(glob: str) -> re.Pattern[str]:
    """`*` any run of characters, `?` one; `(*` a literal pointer receiver; everything else literal."""
    parts, i = [], 0
    while i < len(glob):
        ch = glob[i]
        if ch == "(" and glob.startswith("(*", i):
            parts.append(re.escape("(*"))
            i += 2
            continue
        parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
        i += 1
    return re.compile("".join(parts) + r"\Z")


def is_glob(symbol: str) -> bool:
    return "?" in symbol or "*" in symbol.replace("(*", "")


# What the compiler makes of a function's closures, defers, go statements and method values: a glob
# leaves them out (`(*Store).*` means the methods), an exact symbol may still name one.
GENERATED = re.compile(r"\.(func|deferwrap|gowrap)\d+(\.\d+)*$|-fm$|-range\d+")


def _matches(spec: FunctionSpec, names: list[str]) -> list[str]:
    want = spec.symbol
    if is_glob(want):
        rx = _pattern(printed_name(want))
        return [n for n in names if rx.match(printed_name(n)) and not GENERATED.search(n)]
    base = printed_name(want).removesuffix("[...]")
    return [n for n in names if n == want or printed_name(n) in (want, base + "[...]")]


def _unfit(gb: GoBinary, f: Function) -> str | None:
    """Why a function found in the binary cannot get spans, or None."""
    if f.name.startswith(REFUSED_PREFIXES):
        return "the Go runtime and its internals are not traced"
    if f.name.endswith(".abi0"):
        return "an assembly function"
    rets = gb.return_sites_of(f)
    if not rets:
        return "it has no RET instruction (never returns normally, or ends in a tail jump)"
    if gb.entry_probe_of(f).addr in rets:
        return "too small: its first instruction is its return"
    return None


def expand(gb: GoBinary, options: Options) -> Expansion:
    """The functions of this binary the config names, in config order, at most max_functions."""
    if not options.functions:
        return Expansion((), ())
    names = sorted(gb.functions())
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    seen: set[int] = set()
    for spec in options.functions:
        found = _matches(spec, names)
        if not found:
            why = ("inlined into every caller: no call of it is left to probe (mark it //go:noinline)"
                   if not is_glob(spec.symbol) and gb.inlined_only(spec.symbol) else "no such function in the binary")
            skipped.append((spec.symbol, why))
            continue
        for f in (f for symbol in found for f in gb.functions_named(symbol)):
            if f.start in seen:
                continue
            seen.add(f.start)
            why_not = _unfit(gb, f)
            if why_not is not None:
                skipped.append((f.name, why_not))
            elif len(targets) >= options.max_functions:
                skipped.append((f.name, f"beyond max_functions ({options.max_functions})"))
            else:
                full = printed_name(f.name)
                targets.append(Target(f.name, f.start, full, short_name(full), spec))
    return Expansion(tuple(targets), tuple(skipped))


@dataclass(frozen=True)
class Plan:
    """The points of one function: (address, BPF function), and how each end is found, for inspect."""

    points: tuple[tuple[int, str], ...]
    entry: str
    end: str

    @property
    def emulated(self) -> bool:
        return "single-stepped" not in self.entry + self.end


def plan(gb: GoBinary, i: int, f: Function, callers: Callers) -> Plan:
    """Entry and end points for function `i`: on the callee (entry point, RETs) or, where every call of
    it is a direct call gobinary/callers.py found, in its callers, where the kernel emulates them."""
    ep = gb.entry_probe_of(f)
    rets = gb.return_sites_of(f)
    direct = not callers.taken and bool(callers.sites)
    why_not = callers.taken or "no direct call of it found"
    entry_emulated = ep.kind != "entry" or is_emulated(gb.elf.read(ep.addr, 2))
    if entry_emulated or not direct:
        entry = [(ep.addr, f"uprobe_fn_entry_{i}")]
        how_entry = "at its entry" + ("" if entry_emulated else f" (single-stepped: {why_not})")
    else:
        entry = [(site, f"uprobe_fn_call_{i}") for site in callers.sites]
        how_entry = f"at its {len(callers.sites)} call(s)"
    after = [gb.point_after_call_site(site) for site in callers.sites] if direct else []
    if direct and all(p.addr for p in after):
        end = [(p.addr, f"uprobe_fn_ret_{i}") for p in after]
        how_end = f"after its {len(after)} call(s)"
    else:
        reason = next((p.reason for p in after if not p.addr), why_not)
        end = [(a, f"uprobe_fn_end_{i}") for a in rets]
        how_end = f"at its {len(rets)} RET(s) (single-stepped: {reason})"
    return Plan(tuple(entry + end), how_entry, how_end)


def _function(gb: GoBinary, t: Target) -> Function:
    for f in gb.functions_named(t.symbol):
        if f.start == t.start:
            return f
    raise ProbeUnavailable(f"{t.symbol} at {t.start:#x} is gone from the binary")


# ---- records: struct fn_event in functions.c, checked field by field at compile time.
RECORD = Record("fn_event", (*HEADER, *TRACE_CTX, Field("fn", "I"), Field("panicked", "B"),
                             Field("parent_source", "B"), Field("depth", "H")))
assert RECORD.size == 80, RECORD.size
STAT_FIELDS = ("calls", "spans", "dropped_rate", "dropped_short", "dropped_depth")   # struct fn_stat, in order
STAT_LAYOUT = struct.Struct("<5Q")


@dataclass
class FunctionState:
    """Per binary: the expansion the program was built with, and the counters last exported."""

    targets: tuple[Target, ...]
    attributes: list[dict[str, AttrValue]]
    counted: dict[tuple[int, str], int]


class Functions(Probe):
    name, title, scope, source = "functions", "function spans", SCOPE_NAME, BPF_SOURCE
    hooks = (Hook(PANIC_HOOK, "uprobe_fn_panic", required=True),)
    record = RECORD
    context = "reads"
    goroutine_spans = True
    from_config = ("no function named by the config (receivers::ebpf_go::functions); "
                   "`inspect --functions GLOB` shows what one would trace")

    def options_from(self, receiver_config: Any) -> Options:
        c = receiver_config
        return Options(tuple(FunctionSpec(f.symbol, int(round(f.min_duration * 1e9)), tuple(f.attributes.items()),
                                          f.max_spans_per_second) for f in c.functions), c.max_functions)

    @staticmethod
    def options(build: Build) -> Options:
        opts = build.options.get("functions")
        return opts if isinstance(opts, Options) else Options()

    def present(self, gb: GoBinary) -> bool:
        return False      # a library probe's question; which functions get spans is config (`wanted`)

    def wanted(self, gb: GoBinary, build: Build) -> bool:
        return bool(self.options(build).functions) and gb.function(PANIC_HOOK) is not None

    def notes(self, gb: GoBinary, build: Build) -> list[str]:
        ex = expand(gb, self.options(build))
        return [f"function {s}: not traced: {why}" for s, why in ex.skipped]

    def _targets(self, gb: GoBinary, build: Build) -> tuple[Target, ...]:
        targets = expand(gb, self.options(build)).targets
        if not targets:
            raise ProbeUnavailable("none of the configured functions can be traced in this binary")
        return targets

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        targets = self._targets(gb, build)
        table = " ".join(f"FN({i},{t.spec.min_duration_ns}ULL,{t.spec.max_spans_per_second}ULL)"
                         for i, t in enumerate(targets))
        return [f"-DFN_TABLE={table}", f"-DFN_COUNT={len(targets)}",
                f"-DFN_GOROUTINES={min(build.max_inflight, FN_GOROUTINES_MAX)}"]

    def extra_points(self, gb: GoBinary, build: Build) -> list[tuple[int, str]]:
        return [pt for plan in self.plans(gb, build) for pt in plan.points]

    def plans(self, gb: GoBinary, build: Build) -> list[Plan]:
        """Where each function's span starts and ends in this binary."""
        targets = self._targets(gb, build)
        funcs = [_function(gb, t) for t in targets]
        return [plan(gb, i, f, c) for i, (f, c) in enumerate(zip(funcs, gb.callers(funcs).values(), strict=True))]

    def report(self, gb: GoBinary) -> dict[str, Any]:
        return {}

    def binary_state(self, gb: GoBinary, build: Build) -> FunctionState:
        targets = self._targets(gb, build)
        attrs = [{"code.function.name": t.full, **dict(t.spec.attributes)} for t in targets]
        return FunctionState(targets, attrs, {})

    def spans(self, records: list[Any], state: FunctionState, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        out = []
        targets, attrs = state.targets, state.attributes
        for (_kind, tgid, start, end, _g, trace_id, span_id, parent, flags, _remote, fn, panicked, _src,
             _depth) in records:
            if fn >= len(targets):
                continue
            span = Span(trace_id, span_id, targets[fn].name, parent_span_id=parent if any(parent) else b"",
                        kind=KIND_INTERNAL, start_time_unix_nano=start + mono_to_unix,
                        end_time_unix_nano=end + mono_to_unix, attributes=dict(attrs[fn]),
                        flags=0x100 | (flags & 0xFF))
            if panicked:
                span.status_code, span.status_message = STATUS_ERROR, "panic"
            out.append((tgid, span))
        return out

    def read_counters(self, bpf: Any, state: FunctionState) -> list[tuple[str, str, int]]:
        """(function, counter, increase since the last read) from the program's fn_stats array."""
        grown = []
        table = bpf["fn_stats"]
        for i, t in enumerate(state.targets):
            raw = table.lookup(i.to_bytes(4, "little"))
            if raw is None:
                continue
            for name, value in zip(STAT_FIELDS, STAT_LAYOUT.unpack_from(raw), strict=False):
                delta = value - state.counted.get((i, name), 0)
                if delta > 0:
                    state.counted[(i, name)] = value
                    grown.append((t.full, name, delta))
        return grown


PROBE = Functions()
