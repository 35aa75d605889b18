"""Cross-process trace propagation for the eBPF receiver, chosen once at start.

Modes (config `propagation:`):
  probe_write  write `traceparent` into the outgoing request's bufio buffer from the uprobe
               (bpf/traceparent_probe_write.h; needs a kernel that allows bpf_probe_write_user,
               which lockdown refuses: probe_write.py test-loads a tiny program to know);
  sk_msg       insert the header into the HTTP/1.x request bytes at the socket (skmsg.py);
  stitch       join client and server spans of processes on this host in user space (stitch.py);
  off          nothing crosses process boundaries;
  auto         the first of sk_msg, probe_write, stitch that works here. sk_msg comes first because
               it never writes into the traced process's memory (the request is changed in the
               kernel's copy of the bytes, after Go wrote them); probe_write is the choice of hosts
               without cgroup v2 / sock_ops where the kernel allows the helper.
The choice is logged once and exported as the gauge `otelgo_ebpf_propagation_mode{mode}` (1 for
the mode in use, 0 for the others).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import probe_write
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
           pin_dir: str = "/sys/fs/bpf/otelgo",
           probe_write_check: Callable[[], probe_write.Capability] = probe_write.check,
           make_skmsg: Callable[[str], Any] = SkMsgPropagation) -> PropagationChoice:
    """Pick and start the propagation mode. `requested` is one of MODES.

    auto: sk_msg if sock_ops + sk_msg attach, else probe_write if this kernel loads a program
    calling bpf_probe_write_user, else stitch (which needs nothing from the kernel). An explicit mode
    that cannot work here falls back the same way (probe_write -> sk_msg -> stitch; sk_msg ->
    stitch) with one warning line naming the reason and the mode used instead.
    In probe_write mode the client probe must be compiled with the writer
    (probes.nethttp_client.cflags(probe_write=True)) and attached with it."""
    if requested not in MODES:
        raise ValueError(f"propagation: unknown mode {requested!r}; one of {', '.join(MODES)}")
    tried: list[str] = []
    refused = ""
    choice: PropagationChoice | None = None
    if requested == "off":
        choice = PropagationChoice("off", "configured")
    def try_probe_write() -> PropagationChoice | None:
        nonlocal refused
        cap = probe_write_check()
        if cap.supported:
            return PropagationChoice("probe_write", cap.reason)
        refused = cap.reason
        tried.append(f"probe_write: {cap.reason}")
        return None

    if choice is None and requested == "probe_write":
        choice = try_probe_write()
    if choice is None and requested in ("auto", "probe_write", "sk_msg"):
        sk = make_skmsg(pin_dir)
        try:
            sk.start()
            choice = PropagationChoice("sk_msg", f"sock_ops on {sk.cgroup} and sk_msg attached", sk)
        except PropagationError as e:
            tried.append(f"sk_msg: {e}")
    try:
        if choice is None and requested == "auto":
            choice = try_probe_write()
        if choice is None:
            why = "configured" if requested == "stitch" else "fallback"
            choice = PropagationChoice("stitch", why)
        choice.tried = tried
        if requested == "probe_write" and choice.mode != "probe_write":
            log.warning("propagation: probe_write unavailable, %s: falling back to %s", refused, choice.mode)
        elif requested not in ("auto", choice.mode):
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
    except BaseException:
        if choice is not None:
            choice.stop()   # sock_ops must not stay attached for a choice nobody holds
        raise
