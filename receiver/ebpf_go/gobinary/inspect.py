"""`otelgo-collector inspect PATH|PID [--json]`: what the eBPF receiver would do with a Go binary.

Prints the Go version, the modules, which instrumentations the receiver attaches (and, for each it
does not, why: the receiver's own checks are run) and, per hooked function, its
address, the entry probe point, every return site, and the struct offsets the probes need with
where each came from (DWARF, the bundled table, or a guess from the nearest known version).
Exit status: 0 done, 1 the file is not a usable Go binary, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .binary import GoBinary
from .errors import BinaryError

# Libraries a Go service may link that the receiver has no probe for yet: shown as `[ ]` with why.


def _probes() -> list[Any]:
    """The receiver's registry of probes (imported here: the probes themselves import this package)."""
    from receiver.ebpf_go.probes import PROBES
    return PROBES


def _build(b: GoBinary, functions: list[str] | None) -> Any:
    """What the receiver would build this binary's programs with (functions: `--functions` globs)."""
    from receiver.ebpf_go.probes import Build, ctx_readers
    from receiver.ebpf_go.probes.functions import FunctionSpec, Options
    opts = {"functions": Options(tuple(FunctionSpec(g) for g in functions or ()))}
    return Build("/sys/fs/bpf/otelgo-inspect", 16384, 1024,
                 ctx_readers=ctx_readers([p for p in _probes() if p.present(b)]), options=opts)


def _attach_verdict(b: GoBinary, probe: Any, functions: list[str] | None = None) -> tuple[bool, str]:
    """(whether the receiver attaches this probe to `b`, why not): the receiver's own checks, run
    the same way (wanted, then the program's constants, which fail when an offset is missing)."""
    build = _build(b, functions)
    if probe.from_config and not probe.wanted(b, build):
        return False, probe.from_config
    if not probe.from_config and not probe.present(b):
        wanted = [h.symbol for h in probe.hooks if h.required] or [h.symbol for h in probe.hooks if h.when is None]
        return False, f"not linked: no {' or '.join(wanted)} in this binary"
    try:
        probe.cflags(b, build)
    except Exception as e:  # ProbeUnavailable: the receiver leaves the probe off, logging this
        return False, str(e)
    return True, ""


def _resolve(target: str) -> str:
    if target.isdigit():
        exe = f"/proc/{target}/exe"
        if not os.path.exists(f"/proc/{target}"):
            raise BinaryError(f"no process with pid {target}")
        try:
            os.readlink(exe)
        except PermissionError as e:
            raise BinaryError(f"pid {target}: permission denied reading {exe} (run as root)") from e
        except OSError as e:
            raise BinaryError(f"pid {target}: cannot read {exe}: {e.strerror}") from e
        return exe
    return target


def _function_report(b: GoBinary, name: str) -> dict[str, Any] | None:
    f = b.function(name)
    if f is None:
        return None
    ep = b.entry_probe(name)
    rets = b.return_sites(name)
    return {
        "name": name,
        "start": f.start,
        "end": f.end,
        "entry_probe": {"addr": ep.addr, "kind": ep.kind, "reason": ep.reason},
        "return_sites": rets,
        "caller_return_points": None,
    }


def _function_spans(b: GoBinary, functions: list[str]) -> dict[str, Any]:
    """`--functions`: what the receiver's function spans would trace, with each function's points."""
    from receiver.ebpf_go.probes.functions import PROBE, expand
    build = _build(b, functions)
    ex = expand(b, PROBE.options(build))
    plans = PROBE.plans(b, build) if ex.targets else []
    return {"traced": [{"symbol": t.symbol, "span_name": t.name, "start": t.start, "entry": p.entry, "end": p.end,
                        "emulated": p.emulated, "points": [{"addr": a, "program": fn} for a, fn in p.points]}
                       for t, p in zip(ex.targets, plans, strict=True)],
            "skipped": [{"symbol": sym, "reason": why} for sym, why in ex.skipped]}


def collect(b: GoBinary, functions: list[str] | None = None) -> dict[str, Any]:
    """Everything `inspect` shows, as plain data (the --json output); `functions`: the globs of
    `--functions` (what function spans would trace)."""
    out: dict[str, Any] = {
        "path": b.path,
        "arch": b.arch,
        "arch_tested": b.arch == "amd64",
        "go_version": b.go_version,
        "pie": b.is_pie,
        "stripped": b.stripped,
        "functions_from": b.function_source,
        "dwarf": b.has_dwarf,
        "main_module": b.main_module,
        "modules": dict(sorted(b.modules.items())),
        "build_settings": b.build_settings,
        "instrumentations": [],
        "warnings": [],
    }
    if b.arch != "amd64":
        out["warnings"].append(f"{b.arch}: parsed but untested; entry probes stay at function entry")
    for probe in _probes():
        hooked = [h.symbol for h in probe.hooks if b.function(h.symbol) is not None]
        applies, reason = _attach_verdict(b, probe, functions)
        item: dict[str, Any] = {"name": probe.title, "probe": probe.name, "applies": applies, "reason": reason,
                                "functions": [], "offsets": [], "warnings": []}
        if hooked:
            for n in hooked:
                rep = _function_report(b, n)
                if rep is not None:
                    item["functions"].append(rep)
                    if not rep["return_sites"]:
                        item["warnings"].append(f"{n}: no return instruction found")
            item.update(probe.report(b))
            try:
                wanted = probe.binary_offsets(b)
            except Exception:   # ProbeUnavailable: the verdict above says why
                wanted = probe.offsets
            for o in wanted:
                struct, fld = o.struct, o.field
                off = b.struct_offset(struct, fld)
                module, version = b.module_of(struct)
                if off is None:
                    if module != "std" and module not in b.modules:
                        continue  # the module is not linked: nothing to read
                    item["offsets"].append({"struct": struct, "field": fld, "offset": None, "source": None,
                                            "detail": f"unknown or absent in {module}@{version}"})
                else:
                    item["offsets"].append({"struct": struct, "field": fld, "offset": off.value,
                                            "source": off.source, "detail": off.detail})
                    if off.source == "guess":
                        item["warnings"].append(f"{struct}.{fld}: {off.detail}")
        out["instrumentations"].append(item)
    if functions:
        out["function_spans"] = _function_spans(b, functions)
    out["warnings"].extend(b.warnings)
    return out


_ITEM_KEYS = {"name", "probe", "applies", "reason", "functions", "offsets", "warnings", "end", "routes"}


def render(rep: dict[str, Any]) -> str:
    lines = [
        f"{rep['path']}",
        f"  Go {rep['go_version']}  {rep['arch']}{'' if rep['arch_tested'] else ' (untested)'}"
        f"  {'PIE' if rep['pie'] else 'non-PIE'}  {'stripped' if rep['stripped'] else 'symbols'}"
        f"  functions from {rep['functions_from']}  DWARF {'yes' if rep['dwarf'] else 'no'}",
        f"  main module: {rep['main_module'] or '-'}",
    ]
    if rep["modules"]:
        lines.append("  modules:")
        lines += [f"    {p} {v}" for p, v in rep["modules"].items()]
    lines.append("  instrumentations:")
    for inst in rep["instrumentations"]:
        lines.append(f"    [{'x' if inst['applies'] else ' '}] {inst['name']}"
                     + ("" if inst["applies"] else f": {inst['reason']}"))
        for f in inst["functions"]:
            ep = f["entry_probe"]
            rets = ", ".join(f"{a:#x}" for a in f["return_sites"]) or "none"
            lines.append(f"        {f['name']}  {f['start']:#x}-{f['end']:#x}")
            lines.append(f"          entry probe {ep['addr']:#x} (+{ep['addr'] - f['start']}) {ep['kind']}: {ep['reason']}")
            lines.append(f"          return sites ({len(f['return_sites'])}): {rets}")
        end = inst.get("end")
        if end is not None:
            pts = ", ".join(f"{p['addr']:#x} {p['program']}" for p in end["points"]) or "none"
            lines.append(f"        span end: {end['mode'] or 'not attached'}: {pts}"
                         + (f" ({end['reason']})" if end["reason"] else ""))
        for r in inst.get("routes") or []:
            state = f"read at {r['addr']:#x}" if r["attach"] else "not read, spans keep the method-only name"
            lines.append(f"        routes: {r['framework']} {r['version'] or '(version unknown)'}: {state}: {r['reason']}")
        for key, value in inst.items():
            if key not in _ITEM_KEYS and isinstance(value, str):
                lines.append(f"        {key}: {value}")
        for o in inst["offsets"]:
            val = "absent/unknown" if o["offset"] is None else f"{o['offset']:>4}"
            src = o["source"] or "-"
            lines.append(f"        offset {o['struct']}.{o['field']} = {val}  [{src}] {o['detail']}")
        for w in inst["warnings"]:
            lines.append(f"        warning: {w}")
    fs = rep.get("function_spans")
    if fs is not None:
        lines.append("  function spans (--functions):")
        for t in fs["traced"]:
            lines.append(f"    [x] {t['symbol']}  {t['start']:#x}  span \"{t['span_name']}\"")
            lines.append(f"          starts {t['entry']}; ends {t['end']}")
        for sk in fs["skipped"]:
            lines.append(f"    [ ] {sk['symbol']}: {sk['reason']}")
    for w in rep["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="otelgo-collector inspect", description="Show what the eBPF receiver reads "
                                 "from a Go executable: version, modules, hook points, offsets.")
    ap.add_argument("target", metavar="PATH|PID", help="a Go executable, or the pid of a running Go process")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--functions", action="append", metavar="GLOB",
                    help="also show what function spans for this symbol or glob would trace (repeatable)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    try:
        b = GoBinary.open(_resolve(args.target))
        rep = collect(b, args.functions)
    except BinaryError as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    if args.target.isdigit():
        rep["pid"] = int(args.target)
    print(json.dumps(rep, indent=2) if args.json else render(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
