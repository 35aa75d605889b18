"""Measured with BCC: the cheap entry point (the jcc after the stack check) fires exactly when the
function entry fires and sees the same argument registers and goroutine, also across stack growth.

Needs root and eBPF (marked `root`): skipped when not root, unless CI=true where it must run.
Run the cost measurement by hand:  sudo .venv/bin/python -m tests.unit.gobinary.test_probes_bpf
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from receiver.ebpf_go.bpfprogram import release_bpf
from receiver.ebpf_go.gobinary import GoBinary

from .conftest import fixture_binary

pytestmark = pytest.mark.root

if os.geteuid() != 0 and os.environ.get("CI") != "true":
    pytest.skip("needs root for eBPF (runs under CI=true)", allow_module_level=True)

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>

struct key_t {
    u64 site;  /* SITE_* below */
    u64 g;     /* R14: the goroutine */
    u64 ax;    /* first int argument */
    u64 bx;    /* second int argument */
};
/* hits: (site, g, ax, bx) -> times seen; written by every probe, read by the test */
BPF_HASH(hits, struct key_t, u64, 262144);

static __always_inline int record(struct pt_regs *ctx, u64 site) {
    struct key_t k = {};
    k.site = site;
    k.g = ctx->r14;
    k.ax = ctx->ax;
    k.bx = ctx->bx;
    hits.increment(k);
    return 0;
}
int on_entry(struct pt_regs *ctx) { return record(ctx, 0); }
int on_jcc(struct pt_regs *ctx)   { return record(ctx, 1); }
int on_ret(struct pt_regs *ctx)   { return record(ctx, 2); }
"""

SITE_ENTRY, SITE_JCC, SITE_RET = 0, 1, 2


def _bpf() -> Any:
    from bcc import BPF  # type: ignore[import-not-found]

    return BPF(text=BPF_TEXT.encode())


_cleanup = release_bpf  # closes PMU uprobes without tracefs, then frees the BPF object


def _run(binary: Path, args: list[str], attach: dict[str, list[int]], fn: str | None = None
         ) -> tuple[Counter[tuple[int, int, int, int]], str, float]:
    """Start the fixture (it waits on stdin), attach, release it, return the hit map and stdout."""
    proc = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    b = _bpf() if attach else None
    try:
        for handler, addrs in attach.items():
            for a in addrs:
                b.attach_uprobe(name=str(binary).encode(), addr=a, fn_name=handler.encode(), pid=proc.pid)
        t0 = time.perf_counter()
        out, _ = proc.communicate("go\n", timeout=120)
        elapsed = time.perf_counter() - t0
        hits: Counter[tuple[int, int, int, int]] = Counter()
        if b is not None:
            for k, v in b[b"hits"].items():
                hits[(k.site, k.g, k.ax, k.bx)] = v.value
        return hits, out.strip(), elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
        if b is not None:
            _cleanup(b)


def _per_site(hits: Counter[tuple[int, int, int, int]], site: int) -> Counter[tuple[int, int, int]]:
    return Counter({(g, ax, bx): n for (s, g, ax, bx), n in hits.items() if s == site})


@pytest.mark.parametrize("variant", ["stripped", "stripped-pie"])
def test_jcc_point_equals_entry_with_stack_growth(variant: str) -> None:
    path = fixture_binary("1.27", variant)
    gb = GoBinary.open(path)
    f = gb.function("main.deep")
    assert f is not None
    ep = gb.entry_probe("main.deep")
    assert ep.kind == "jcc-after-stack-check"
    rets = gb.return_sites("main.deep")
    depth, goroutines = 60, 40
    hits, out, _ = _run(path, ["recurse", str(depth), str(goroutines)],
                        {"on_entry": [f.start], "on_jcc": [ep.addr], "on_ret": rets})
    assert out  # the program finished and printed its sum: probes did not corrupt it
    entry, jcc, ret = (_per_site(hits, s) for s in (SITE_ENTRY, SITE_JCC, SITE_RET))
    calls = goroutines * (depth + 1)
    # Same (goroutine, arg1, arg2) tuples with the same multiplicity at the entry and at the jcc.
    assert jcc == entry
    # Returns happen once per call. At a return RAX holds the result, so count, don't compare keys.
    assert sum(ret.values()) == calls
    extra = sum(entry.values()) - calls
    # Each fresh goroutine starts on a small stack, so the recursion must grow it at least once:
    # morestack re-executes deep from its entry and both probes fire again for that call.
    assert extra >= 1
    assert sum(jcc.values()) == sum(entry.values())
    print(f"\n{variant}: calls={calls} entry_hits={sum(entry.values())} jcc_hits={sum(jcc.values())} "
          f"ret_hits={sum(ret.values())} re-entries_after_morestack={extra}")


def test_jcc_point_plain_calls() -> None:
    path = fixture_binary("1.27", "stripped")
    gb = GoBinary.open(path)
    f = gb.function("main.manyReturns")
    assert f is not None
    ep = gb.entry_probe("main.manyReturns")
    assert ep.kind == "jcc-after-stack-check"
    n = 2000
    hits, out, _ = _run(path, ["calls", str(n)], {"on_entry": [f.start], "on_jcc": [ep.addr],
                                                  "on_ret": gb.return_sites("main.manyReturns")})
    assert out
    entry, jcc, ret = (_per_site(hits, s) for s in (SITE_ENTRY, SITE_JCC, SITE_RET))
    assert jcc == entry
    assert sum(ret.values()) == n
    # The main goroutine's stack may grow during a call (then entry and jcc both fire twice); the GC
    # can shrink it again, so growth recurs now and then: rare, never zero-or-negative.
    extra = sum(entry.values()) - n
    assert 0 <= extra <= n // 100
    assert {ax for (_, ax, _) in entry} == {0, 1, 2, 3}  # the one argument, x = i % 4
    print(f"\nmanyReturns: calls={n} entry_hits={sum(entry.values())} jcc_hits={sum(jcc.values())} "
          f"ret_hits={sum(ret.values())} re-entries_after_morestack={extra}")


def measure(n: int = 200_000) -> list[tuple[str, float]]:
    """ns per call of main.manyReturns (plus probeTarget's unprobed cost) under each probe placement."""
    path = fixture_binary("1.27", "stripped")
    gb = GoBinary.open(path)
    f = gb.function("main.manyReturns")
    assert f is not None
    ep = gb.entry_probe("main.manyReturns")
    rets = gb.return_sites("main.manyReturns")
    rows = []
    base = min(_run(path, ["calls", str(n)], {})[2] for _ in range(3))
    for label, attach in [
        ("entry at +0 (cmp, single-stepped)", {"on_entry": [f.start]}),
        (f"entry at +{ep.addr - f.start} ({ep.kind}, emulated)", {"on_jcc": [ep.addr]}),
        ("every ret", {"on_ret": rets}),
        ("jcc + every ret", {"on_jcc": [ep.addr], "on_ret": rets}),
    ]:
        t = min(_run(path, ["calls", str(n)], attach)[2] for _ in range(3))
        rows.append((label, (t - base) / n * 1e9))
    return rows


if __name__ == "__main__":
    for label, ns in measure():
        print(f"{label:45s} {ns:8.0f} ns/call added")
