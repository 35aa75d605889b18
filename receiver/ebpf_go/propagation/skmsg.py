"""sk_msg propagation: insert `traceparent` into outgoing HTTP/1.x requests at the socket.

Loads skmsg_traceparent.c (beside this file) once per collector: a sock_ops program on the cgroup v2 root puts
every client socket of a watched (traced) process into a sockhash, and an sk_msg program on that sockhash rewrites the first
send of a request for which the uprobe side (probes/nethttp_client/nethttp_client.c) left a pending trace context.
The maps the two sides share are pinned under `pin_dir` (bpffs); this module owns them: it
creates them at start and unlinks them at stop. Compiled in a child process (compilechild.run_compiler)
and loaded with bpfsys: no BCC in the collector process.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.errors import KernelError

from .. import bpfsys, hostfs, preflight
from ..bpfobjects import LoadedProgram
from ..compilechild import run_compiler
from ..images import ImageStore

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"   # shared headers (traceparent_handoff.h)
SOURCE = Path(__file__).resolve().with_name("skmsg_traceparent.c")
DEFAULT_PIN_DIR = "/sys/fs/bpf/otelgo"

# Indexes of the `counts` array (bpf/skmsg_traceparent.c OUTCOME_* and COUNT_*).
OUTCOMES: dict[int, str] = {
    1: "injected",
    2: "stale",
    3: "not_http",
    4: "existing_traceparent",
    5: "split_request",
    6: "pull_failed",
    7: "push_failed",
    8: "not_http1",
}
BPF_F_ALLOW_MULTI = bpfsys.BPF_F_ALLOW_MULTI
COUNT_SAME_THREAD = 12
COUNT_OTHER_THREAD = 13
# Client connections sock_ops could not put into `socks`, by reason (their requests go unchanged).
SOCKETS_SKIPPED: dict[int, str] = {
    14: "held_elsewhere",   # another sk_msg program holds the socket (EBUSY)
    15: "not_added",        # anything else (map full, ...)
}
HELD_ELSEWHERE_HINT = ("another sk_msg program holds this host's client sockets (a second otelgo-collector, a "
                       "CNI's socket acceleration, or a sock_ops attach left behind: `bpftool cgroup tree` "
                       "lists them)")


def _cgroup_link(prog_fd: int, cgroup_fd: int) -> int:
    """Attach a sock_ops program to a cgroup through a BPF link (the fd, or -1 if links are
    unavailable). A link is detached by the kernel when its last fd closes, so a collector that is
    killed leaves nothing attached that would keep inspecting every connection of the host."""
    try:
        return bpfsys.link_create(prog_fd, cgroup_fd, bpfsys.BPF_CGROUP_SOCK_OPS)
    except bpfsys.BpfError:
        return -1


class ConnKey(ct.Structure):
    """struct conn_key (bpf/traceparent_handoff.h)."""

    _fields_ = [("tgid", ct.c_uint32), ("lport", ct.c_uint16), ("rport", ct.c_uint16)]


class TpPending(ct.Structure):
    """struct tp_pending (bpf/traceparent_handoff.h)."""

    _fields_ = [("trace_id", ct.c_uint8 * 16), ("span_id", ct.c_uint8 * 8), ("flags", ct.c_uint8),
                ("method_len", ct.c_uint8), ("pad", ct.c_uint8 * 6), ("method", ct.c_char * 8),
                ("ktime", ct.c_uint64), ("tid", ct.c_uint64)]


class TpResult(ct.Structure):
    """struct tp_result (bpf/traceparent_handoff.h)."""

    _fields_ = [("outcome", ct.c_uint32), ("same_thread", ct.c_uint32)]


_TYPES: dict[str, tuple[Any, Any]] = {"tp_pending": (ConnKey, TpPending), "tp_result": (ct.c_uint64, TpResult)}

class PropagationError(RuntimeError):
    """sk_msg propagation could not be set up on this host (message says why)."""


def cgroup2_root() -> str:
    """Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` or, on hybrid hosts, `.../unified`)."""
    root = hostfs.cgroup2_root()
    if root is None:
        raise PropagationError("no cgroup v2 hierarchy mounted (sock_ops needs one)")
    return root


@dataclass
class SkMsgCounts:
    outcomes: dict[str, int]           # requests, by OUTCOMES name
    same_thread: int
    other_thread: int
    sockets_skipped: dict[str, int] = field(default_factory=dict)   # connections, by SOCKETS_SKIPPED name


class SkMsgPropagation:
    """The sock_ops + sk_msg pair; `start()` loads and attaches, `stop()` detaches and unpins."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, fresh_ms: float = 50.0, scan_max: int = 4096,
                 images: ImageStore | None = None) -> None:
        if scan_max & (scan_max - 1) or not 256 <= scan_max <= 8192:
            raise ValueError("scan_max must be a power of two in [256, 8192]")
        self.pin_dir = pin_dir
        self.fresh_ns = int(fresh_ms * 1e6)
        self.scan_max = scan_max
        self.images = images      # compiled images (cache); None: compile in a child each start
        self._bpf: LoadedProgram | None = None
        self._cgroup_fd = -1
        self._link_fd = -1
        self._sockops = -1
        self._skmsg = -1
        self._sock_fd = -1
        self.cgroup = ""

    def cflags(self) -> list[str]:
        return [f"-I{BPF_DIR}", f'-DPIN_DIR="{self.pin_dir}"', f"-DFRESH_NS={self.fresh_ns}ULL",
                f"-DSCAN_MAX={self.scan_max}"]

    def start(self) -> None:
        try:
            preflight.check_bcc()
        except Exception as e:
            raise PropagationError(str(e)) from None
        try:
            hostfs.ensure_bpffs(str(Path(self.pin_dir).parent))
        except KernelError as e:
            raise PropagationError(str(e)) from None
        self._clear_pins()
        os.makedirs(self.pin_dir, exist_ok=True)
        self.cgroup = cgroup2_root()
        source = SOURCE
        try:
            if self.images is not None:
                image = self.images.get(source, self.cflags(), None).image
            else:
                image = run_compiler(source, self.cflags(), None)
            self._bpf = bpf = LoadedProgram(image, self.pin_dir)
            self._sockops = bpf.load_func("sockops_track", bpfsys.PROG_SOCK_OPS)
            self._skmsg = bpf.load_func("skmsg_traceparent", bpfsys.PROG_SK_MSG)
            more = bpf.load_func("skmsg_scan_more", bpfsys.PROG_SK_MSG)
            bpf["scan_progs"].update((1).to_bytes(4, "little"), more.to_bytes(4, "little"))
            self._sock_fd = bpf["socks"].fd
            bpfsys.prog_attach(self._skmsg, self._sock_fd, bpfsys.BPF_SK_MSG_VERDICT)
            self._cgroup_fd = os.open(self.cgroup, os.O_RDONLY)
            self._link_fd = _cgroup_link(self._sockops, self._cgroup_fd)
            if self._link_fd < 0:
                # No BPF links (kernel < 5.7): a plain attach, which outlives a killed collector.
                # BPF_F_ALLOW_MULTI: another collector's sock_ops on the same cgroup stays attached
                # (without it the last attach replaces the others and silently ends their injection).
                bpfsys.prog_attach(self._sockops, self._cgroup_fd, bpfsys.BPF_CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI)
            self._check_sockets_reach_us()
        except PropagationError:
            self.stop()
            raise
        except Exception as e:
            self.stop()
            raise PropagationError(f"sock_ops/sk_msg attach failed: {e}") from None

    def counts(self) -> SkMsgCounts:
        if self._bpf is None:
            return SkMsgCounts({}, 0, 0, {})
        tab = self._bpf["counts"]
        vals = {i: tab.read_u64(i) for i in range(tab.spec.max_entries)}
        return SkMsgCounts({name: vals.get(i, 0) for i, name in OUTCOMES.items()},
                           vals.get(COUNT_SAME_THREAD, 0), vals.get(COUNT_OTHER_THREAD, 0),
                           {name: vals.get(i, 0) for i, name in SOCKETS_SKIPPED.items()})

    def watch(self, tgid: int) -> None:
        """The connections `tgid` opens from now on join the sockhash (and only a watched process's
        do: a socket there sends through the kernel's slower sk_msg path)."""
        if self._bpf is not None:
            self._bpf["traced"].update(tgid.to_bytes(4, "little"), b"\x01")

    def unwatch(self, tgid: int) -> None:
        if self._bpf is not None:
            self._bpf["traced"].delete(tgid.to_bytes(4, "little"))

    def _check_sockets_reach_us(self) -> None:
        """One loopback connection of the collector's own: if another sk_msg program took it, every
        connection goes to that one first and nothing would ever be inserted: refuse now, with the
        reason, rather than run a propagation mode that silently does nothing."""
        before = self.counts().sockets_skipped.get("held_elsewhere", 0)
        me = os.getpid()
        watched = self._bpf is not None and self._bpf["traced"].lookup(me.to_bytes(4, "little")) is not None
        self.watch(me)
        try:
            with socket.create_server(("127.0.0.1", 0)) as srv, \
                    socket.create_connection(srv.getsockname()[:2], timeout=2.0):
                pass
        except OSError:
            return   # no loopback here: nothing to learn from it
        finally:
            if not watched:
                self.unwatch(me)
        if self.counts().sockets_skipped.get("held_elsewhere", 0) > before:
            raise PropagationError(HELD_ELSEWHERE_HINT)

    def table(self, name: str) -> Any:
        """A map of the program (bpfobjects.BpfMap); the maps shared with the client probe have their
        C structs as `Key`/`Leaf`, so `tab[tab.Key(...)] = tab.Leaf(...)` works."""
        if self._bpf is None:
            raise PropagationError("sk_msg propagation is not started")
        tab = self._bpf[name]
        tab.Key, tab.Leaf = _TYPES.get(name, (None, None))
        return tab

    def stop(self) -> None:
        if self._link_fd >= 0:
            os.close(self._link_fd)  # closing the link detaches the sock_ops program
            self._link_fd = -1
        elif self._cgroup_fd >= 0 and self._sockops >= 0:
            with contextlib.suppress(bpfsys.BpfError):
                bpfsys.prog_detach(self._sockops, self._cgroup_fd, bpfsys.BPF_CGROUP_SOCK_OPS)
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._sock_fd >= 0 and self._skmsg >= 0:
            with contextlib.suppress(bpfsys.BpfError):
                bpfsys.prog_detach(self._skmsg, self._sock_fd, bpfsys.BPF_SK_MSG_VERDICT)
        self._sock_fd = -1
        if self._bpf is not None:
            self._bpf.close()   # closes the program and map fds (the sockhash with them)
            self._bpf = None
        self._sockops = self._skmsg = -1
        self._clear_pins()

    def _clear_pins(self) -> None:
        for name in ("tp_pending", "tp_result"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pin_dir, name))


def conn_key(tgid: int, lport: int, rport: int) -> Any:
    """The `struct conn_key` of bpf/skmsg_traceparent.c (for tests and tools)."""
    return ConnKey(tgid, lport, rport)
