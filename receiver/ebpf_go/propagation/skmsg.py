"""sk_msg propagation: insert `traceparent` into outgoing HTTP/1.x requests at the socket.

Loads bpf/skmsg_traceparent.c once per collector: a sock_ops program on the cgroup v2 root puts
every client socket into a sockhash, and an sk_msg program on that sockhash rewrites the first
send of a request for which the uprobe side (bpf/nethttp_client.c) left a pending trace context.
The maps the two sides share are pinned under `pin_dir` (bpffs); this module owns them: it
creates them at start and unlinks them at stop.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"
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
BPF_F_ALLOW_MULTI = 2  # uapi/linux/bpf.h
COUNT_SAME_THREAD = 12
COUNT_OTHER_THREAD = 13



BPF_CGROUP_SOCK_OPS = 3  # enum bpf_attach_type


def _cgroup_link(prog_fd: int, cgroup_fd: int) -> int:
    """Attach a sock_ops program to a cgroup through a BPF link (the fd, or -1 if links are
    unavailable). A link is detached by the kernel when its last fd closes, so a collector that is
    killed leaves nothing attached that would keep inspecting every connection of the host."""
    from bcc import lib

    fn = lib.bpf_link_create
    fn.restype = ct.c_int
    fn.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    return int(fn(prog_fd, cgroup_fd, BPF_CGROUP_SOCK_OPS, None))

class PropagationError(RuntimeError):
    """sk_msg propagation could not be set up on this host (message says why)."""


def cgroup2_root() -> str:
    """Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` or, on hybrid hosts, `.../unified`)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return parts[1]
    raise PropagationError("no cgroup v2 hierarchy mounted (sock_ops needs one)")


def ensure_bpffs(path: str = "/sys/fs/bpf") -> None:
    """Mount bpffs at `path` if nothing is mounted there (pinned maps live on it)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == path and parts[2] == "bpf":
            return
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PropagationError(f"bpffs not mounted at {path} and mounting failed: {proc.stderr.strip()}")


@dataclass
class SkMsgCounts:
    outcomes: dict[str, int]
    same_thread: int
    other_thread: int


class SkMsgPropagation:
    """The sock_ops + sk_msg pair; `start()` loads and attaches, `stop()` detaches and unpins."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, fresh_ms: float = 50.0, scan_max: int = 4096) -> None:
        if scan_max & (scan_max - 1) or not 256 <= scan_max <= 8192:
            raise ValueError("scan_max must be a power of two in [256, 8192]")
        self.pin_dir = pin_dir
        self.fresh_ns = int(fresh_ms * 1e6)
        self.scan_max = scan_max
        self._bpf: Any = None
        self._cgroup_fd = -1
        self._link_fd = -1
        self._sockops: Any = None
        self._skmsg: Any = None
        self._sock_fd = -1
        self.cgroup = ""

    def cflags(self) -> list[str]:
        return [f"-I{BPF_DIR}", f'-DPIN_DIR="{self.pin_dir}"', f"-DFRESH_NS={self.fresh_ns}ULL",
                f"-DSCAN_MAX={self.scan_max}"]

    def start(self) -> None:
        try:
            from bcc import BPF, BPFAttachType, libbcc
        except ImportError as e:
            raise PropagationError(f"bcc not importable: {e}") from None
        ensure_bpffs(str(Path(self.pin_dir).parent))
        self._clear_pins()
        os.makedirs(self.pin_dir, exist_ok=True)
        self.cgroup = cgroup2_root()
        try:
            self._bpf = BPF(src_file=str(BPF_DIR / "skmsg_traceparent.c").encode(), cflags=self.cflags())
            self._sockops = self._bpf.load_func("sockops_track", BPF.SOCK_OPS)
            self._skmsg = self._bpf.load_func("skmsg_traceparent", BPF.SK_MSG)
            more = self._bpf.load_func("skmsg_scan_more", BPF.SK_MSG)
            self._bpf[b"scan_progs"][ct.c_int(1)] = ct.c_int(more.fd)
            self._sock_fd = libbcc.lib.bpf_table_fd(self._bpf.module, b"socks")
            if self._sock_fd < 0:
                raise PropagationError("sockhash `socks` has no fd")
            BPF.attach_func(self._skmsg, self._sock_fd, BPFAttachType.SK_MSG_VERDICT)
            self._cgroup_fd = os.open(self.cgroup, os.O_RDONLY)
            self._link_fd = _cgroup_link(self._sockops.fd, self._cgroup_fd)
            if self._link_fd < 0:
                # No BPF links (kernel < 5.7): a plain attach, which outlives a killed collector.
                # BPF_F_ALLOW_MULTI: another collector's sock_ops on the same cgroup stays attached
                # (without it the last attach replaces the others and silently ends their injection).
                BPF.attach_func(self._sockops, self._cgroup_fd, BPFAttachType.CGROUP_SOCK_OPS, BPF_F_ALLOW_MULTI)
        except PropagationError:
            self.stop()
            raise
        except Exception as e:
            self.stop()
            raise PropagationError(f"sock_ops/sk_msg attach failed: {e}") from None

    def counts(self) -> SkMsgCounts:
        if self._bpf is None:
            return SkMsgCounts({}, 0, 0)
        tab = self._bpf[b"counts"]
        vals = {int(k.value): int(v.value) for k, v in tab.items()}
        return SkMsgCounts({name: vals.get(i, 0) for i, name in OUTCOMES.items()},
                           vals.get(COUNT_SAME_THREAD, 0), vals.get(COUNT_OTHER_THREAD, 0))

    def table(self, name: str) -> Any:
        return self._bpf[name.encode()]

    def stop(self) -> None:
        from bcc import BPF, BPFAttachType
        if self._link_fd >= 0:
            os.close(self._link_fd)  # closing the link detaches the sock_ops program
            self._link_fd = -1
        elif self._cgroup_fd >= 0:
            with contextlib.suppress(Exception):
                BPF.detach_func(self._sockops, self._cgroup_fd, BPFAttachType.CGROUP_SOCK_OPS)
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._sock_fd >= 0 and self._skmsg is not None:
            with contextlib.suppress(Exception):
                BPF.detach_func(self._skmsg, self._sock_fd, BPFAttachType.SK_MSG_VERDICT)
        self._sock_fd = -1
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None
        self._clear_pins()

    def _clear_pins(self) -> None:
        for name in ("tp_pending", "tp_result"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pin_dir, name))


def conn_key(tgid: int, lport: int, rport: int) -> Any:
    """The `struct conn_key` of bpf/skmsg_traceparent.c (for tests and tools)."""
    class ConnKey(ct.Structure):
        _fields_ = [("tgid", ct.c_uint32), ("lport", ct.c_uint16), ("rport", ct.c_uint16)]
    return ConnKey(tgid, lport, rport)
