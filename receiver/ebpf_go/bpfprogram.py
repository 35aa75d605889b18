"""One probe's program for one binary, and the uprobes it has attached by pid: `Program`;
`load_program` (the maps of an image, from images.ImageStore), `attach` (a probe module's attach,
remembering each uprobe it made, even when it fails half-way), `detach_pid` (a process exited),
`close_programs` (binaries released: every uprobe of them detached at once).

`compile_program` compiles and loads in one call (tests, benchmarks); `release_bpf` frees the BCC
objects that tests and benchmarks build in-process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.errors import KernelError

from . import bpfsys
from .bpfobjects import LoadedProgram
from .compilechild import run_compiler
from .images import CompileResult, ImageStore


@dataclass
class Program:
    """One compiled BPF program (one probe module, one binary) and its perf-event links."""

    bpf: LoadedProgram
    source: str
    compile_seconds: float
    origin: str = "compiled"
    # pid -> uprobe keys attached for that pid
    links: dict[int, list[Any]] = field(default_factory=dict)

    def link_count(self) -> int:
        return sum(len(v) for v in self.links.values())


def load_program(result: CompileResult, pin_dir: str | None) -> Program:
    """Create the maps of an image (opening or pinning the pinned ones under `pin_dir`)."""
    try:
        loaded = LoadedProgram(result.image, pin_dir)
    except bpfsys.BpfError as e:
        raise KernelError(f"loading {result.image.source} failed: {e.strerror}: {e.what}") from None
    return Program(loaded, result.image.source, result.seconds, result.origin)


def pin_dir_of(cflags: list[str]) -> str | None:
    for f in cflags:
        if f.startswith("-DPIN_DIR="):
            return f.split("=", 1)[1].strip('"')
    return None


def compile_program(source: Path, cflags: list[str], kernel_source: str | None,
                    store: ImageStore | None = None) -> Program:
    """Compile (in a child) and load; KernelError with the compiler's or loader's message on failure."""
    if store is not None:
        result = store.get(source, cflags, kernel_source)
    else:
        t0 = time.monotonic()
        result = CompileResult(run_compiler(source, cflags, kernel_source), 0.0, "compiled")
        result.seconds = time.monotonic() - t0
    return load_program(result, pin_dir_of(cflags))


def attach(prog: Program, pid: int, attach_fn: Callable[[Any, int], Any]) -> Any:
    """Run a probe module's attach(bpf, pid) and remember the uprobes it created for this pid, even
    when it fails half-way (so that they can be detached). Load/verifier errors become KernelError."""
    before = set(prog.bpf.uprobe_fds)
    try:
        return attach_fn(prog.bpf, pid)
    except Exception as e:
        from .probes.spec import ProbeUnavailable  # here: the probe packages import this module

        if isinstance(e, ProbeUnavailable | KernelError):
            raise
        raise KernelError(f"attaching {prog.source} failed: {str(e).strip().splitlines()[-1] if str(e) else e!r}") \
            from None
    finally:
        new = [k for k in prog.bpf.uprobe_fds if k not in before]
        if new:
            prog.links.setdefault(pid, []).extend(new)


def detach_pid(prog: Program, pid: int) -> int:
    """Close this pid's uprobes (closing the fd detaches), all at once."""
    keys = prog.links.pop(pid, [])
    bpfsys.close_concurrently(prog.bpf.take_uprobes(keys))
    return len(keys)


def close_programs(progs: list[Program]) -> None:
    """Detach every uprobe of these programs at once (one wait of the kernel's, not one per uprobe:
    bpfsys), then free their maps, functions and ring buffers."""
    fds = [fd for prog in progs for fd in prog.bpf.take_uprobes()]
    for prog in progs:
        prog.links.clear()
    bpfsys.close_concurrently(fds)
    for prog in progs:
        prog.bpf.close()



def release_bpf(bpf: Any) -> None:
    """Close every uprobe of a BCC object, then free it. BCC's own cleanup() also edits tracefs
    uprobe_events, which its PMU attach never used and which may not be mounted (it then raises)."""
    from bcc import lib
    for ev_name, fd in list(bpf.uprobe_fds.items()):
        lib.bpf_close_perf_event_fd(fd)
        bpf._del_uprobe_fd(ev_name)
    bpf.cleanup()
