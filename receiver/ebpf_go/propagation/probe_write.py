"""Can this kernel run `bpf_probe_write_user`? Answered by test-loading a tiny program.

Lockdown (integrity or confidentiality) refuses the helper at load time; securityfs may not be
mounted, so reading /sys/kernel/security/lockdown gives no answer we can trust
(ebpf-on-this-platform.md §6.2). Loading is the only reliable test; nothing is attached.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

_PROGRAM = r"""
#include <uapi/linux/ptrace.h>
int otelgo_probe_write_test(struct pt_regs *ctx) {
    u64 v = 0;
    bpf_probe_write_user((void *)ctx->sp, &v, sizeof(v));
    return 0;
}
"""


def probe_write_supported(log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> tuple[bool, str]:
    """(supported, reason). Needs root and BCC; any failure means "not supported"."""
    try:
        from bcc import BPF
    except ImportError as e:  # pragma: no cover - depends on the host
        return False, f"bcc not importable: {e}"
    b: Any = None
    # The kernel (and libbcc) print the verifier refusal to stderr: keep it out of the collector log.
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    try:
        os.dup2(devnull, 2)
        b = BPF(text=_PROGRAM)
        b.load_func("otelgo_probe_write_test", BPF.KPROBE)
        return True, "test program calling bpf_probe_write_user loaded"
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return False, f"test load refused ({msg}); kernel lockdown likely"
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        if b is not None:
            with contextlib.suppress(Exception):
                b.cleanup()
