"""BPF's clock -> wall-clock time. (Record decoding: probes/__init__.py collectors, one precompiled
struct.Struct per record layout, unpacked straight from the ring buffer's memory, no `.event()`.)"""

from __future__ import annotations

import time


def monotonic_to_unix_offset(samples: int = 7) -> int:
    """time.time_ns() - time.monotonic_ns(), from the tightest of several bracketing samples.

    bpf_ktime_get_ns() is CLOCK_MONOTONIC, the same clock as time.monotonic_ns().
    """
    best: tuple[int, int] | None = None
    for _ in range(samples):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        width = m1 - m0
        if best is None or width < best[0]:
            best = (width, w - (m0 + width // 2))
    assert best is not None
    return best[1]
