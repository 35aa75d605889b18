"""Ring-buffer records -> tuples, and BPF's clock -> wall-clock time.

BCC calls back once per record; the callback only unpacks with a precompiled struct.Struct straight
from the record's memory (no `.event()`, no copy), appends, and the spans are built per batch.
"""

from __future__ import annotations

import ctypes as ct
import struct
import time
from collections.abc import Callable
from typing import Any


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


class RecordCollector:
    """A ring-buffer callback that decodes each record into `records` with one Struct."""

    def __init__(self, layout: struct.Struct) -> None:
        self.layout = layout
        self.size = layout.size
        self.records: list[tuple[Any, ...]] = []
        self.short = 0   # records smaller than the layout (a BPF/Python mismatch: counted, skipped)

    def callback(self) -> Callable[[Any, int, int], int]:
        unpack = self.layout.unpack_from
        size = self.size
        records = self.records
        buf_t = ct.c_char * size

        def on_record(_ctx: Any, data: int, n: int) -> int:
            if n < size:
                self.short += 1
                return 0
            records.append(unpack(buf_t.from_address(data)))
            return 0
        return on_record

    def take(self) -> list[tuple[Any, ...]]:
        out = self.records[:]
        self.records.clear()
        return out
