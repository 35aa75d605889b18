"""Cross-process trace propagation for the eBPF receiver, chosen once at start.

Modes (config `propagation:`):
  probe_write  write `traceparent` into the outgoing request from the uprobe (needs a kernel that
               allows bpf_probe_write_user; lockdown refuses it);
  sk_msg       insert the header into the HTTP/1.x request bytes at the socket (skmsg.py);
  stitch       join client and server spans of processes on this host in user space (stitch.py);
  off          nothing crosses process boundaries;
  auto         the first of probe_write, sk_msg, stitch that works here.
The choice is logged once and exported as the gauge `otelgo_ebpf_propagation_mode{mode}` (1 for
the mode in use, 0 for the others).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .probe_write import probe_write_supported
from .skmsg import PropagationError, SkMsgPropagation

MODES = ("auto", "probe_write", "sk_msg", "stitch", "off")
ACTIVE_MODES = ("probe_write", "sk_msg", "stitch", "off")


@dataclass
class PropagationChoice:
    mode: str
    reason: str
    skmsg: SkMsgPropagation | None = None  # started, when mode == "sk_msg"
    tried: list[str] = field(default_factory=list)

    def stop(self) -> None:
        if self.skmsg is not None:
            self.skmsg.stop()
            self.skmsg = None


def choose(requested: str, log: logging.Logger | logging.LoggerAdapter[Any], metrics: Any = None,
           pin_dir: str = "/sys/fs/bpf/otelgo") -> PropagationChoice:
    """Pick and start the propagation mode. `requested` is one of MODES. An explicit mode that
    cannot work here falls back to stitch (which needs nothing from the kernel), with a warning."""
    if requested not in MODES:
        raise ValueError(f"propagation: unknown mode {requested!r}; one of {', '.join(MODES)}")
    tried: list[str] = []
    choice: PropagationChoice | None = None
    if requested == "off":
        choice = PropagationChoice("off", "configured")
    if choice is None and requested in ("auto", "probe_write"):
        ok, why = probe_write_supported(log)
        tried.append(f"probe_write: {why}")
        if ok:
            # The uprobe writer is not built yet: record that the kernel allows it, then go on to
            # sk_msg, which covers the same HTTP/1.x requests without writing process memory.
            tried.append("probe_write: writer not implemented, using the next mode")
    if choice is None and requested in ("auto", "probe_write", "sk_msg"):
        sk = SkMsgPropagation(pin_dir=pin_dir)
        try:
            sk.start()
            choice = PropagationChoice("sk_msg", f"sock_ops on {sk.cgroup} and sk_msg attached", sk)
        except PropagationError as e:
            tried.append(f"sk_msg: {e}")
    if choice is None:
        why = "configured" if requested == "stitch" else "fallback"
        choice = PropagationChoice("stitch", why)
    choice.tried = tried
    if requested not in ("auto", choice.mode):
        log.warning("propagation: %s requested but unavailable, using %s (%s)", requested, choice.mode,
                    "; ".join(tried))
    log.info("propagation mode %s (requested %s): %s%s", choice.mode, requested, choice.reason,
             f" [{'; '.join(tried)}]" if tried else "")
    if metrics is not None:
        g = metrics.gauge("otelgo_ebpf_propagation_mode", "Cross-process trace propagation mode in use (1).",
                          ["mode"])
        for m in ACTIVE_MODES:
            g.labels(mode=m).set(1 if m == choice.mode else 0)
    return choice
