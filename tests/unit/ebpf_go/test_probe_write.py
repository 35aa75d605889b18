"""propagation mode probe_write: the capability check (receiver/ebpf_go/propagation/probe_write.py),
the mode choice (propagation.choose), the writer's decisions (bpf/traceparent_line.h, compiled here
with the host's C compiler: the same code the BPF program runs) and the client probe's cflags and
attach in probe_write mode (probes/nethttp_client.py)."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from typing import Any

import pytest

from receiver.ebpf_go import hostfs
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.probes import nethttp_client as nc
from receiver.ebpf_go.propagation import choose, probe_write
from receiver.ebpf_go.propagation.skmsg import PropagationError
from tests.support.gobuild import build_go_fixture

BPF_DIR = nc.BPF_SOURCE.parent   # traceparent_line.h
ROOT_OK = os.geteuid() == 0 or os.environ.get("CI") == "true"


# ---------------------------------------------------------------- the capability check


def test_test_program_bytes() -> None:
    """The 9 instructions, byte for byte (struct bpf_insn: code, dst|src<<4, off, imm)."""
    assert probe_write.TEST.hex(" ", 8).split() == [
        "7a0af8ff00000000",   # *(u64 *)(r10 - 8) = 0
        "bfa1000000000000",   # r1 = r10
        "07010000f8ffffff",   # r1 += -8
        "bfa2000000000000",   # r2 = r10
        "07020000f8ffffff",   # r2 += -8
        "b703000008000000",   # r3 = 8
        "8500000024000000",   # call 36 (bpf_probe_write_user)
        "b700000000000000",   # r0 = 0
        "9500000000000000",   # exit
    ]
    assert probe_write.CONTROL.hex() == "b700000000000000" + "9500000000000000"


def test_reason_is_the_verifier_line_before_its_statistics() -> None:
    r = probe_write.LoadResult(-1, 22, "6: (85) call bpf_probe_write_user#36\nprogram of this type cannot use "
                                       "helper bpf_probe_write_user#36\nprocessed 7 insns (limit 1000000) "
                                       "max_states_per_insn 0\n")
    assert r.reason == "program of this type cannot use helper bpf_probe_write_user#36"
    assert probe_write.LoadResult(-1, 1, "").reason == "EPERM: Operation not permitted"


@pytest.mark.skipif(not ROOT_OK, reason="needs root (never skipped under CI=true)")
def test_this_kernel_refuses_with_the_verifiers_reason() -> None:
    """The test machines are locked down (integrity): the helper is refused at load time."""
    c = probe_write.check()
    assert c.supported is False
    assert c.verifier == "program of this type cannot use helper bpf_probe_write_user#36"
    mode = hostfs.read_lockdown()   # securityfs may or may not be mounted on the test host
    why = f"kernel lockdown is {mode}" if mode not in (None, "none") else "kernel lockdown likely"
    assert c.reason == ("the kernel refuses bpf_probe_write_user (verifier: program of this type cannot use "
                        f"helper bpf_probe_write_user#36); {why}")
    # the control program (no helper call) loads: the refusal is the helper's, not bpf(2)'s
    ctl = probe_write.prog_load(probe_write.CONTROL, b"otelgo_pwu_ctl")
    assert ctl.fd >= 0 and ctl.errno == 0
    os.close(ctl.fd)


def test_check_without_privilege_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_write, "prog_load", lambda insns, name, log=True: probe_write.LoadResult(-1, 1, ""))
    c = probe_write.check()
    assert (c.supported, c.verifier) == (False, "")
    assert c.reason == "cannot load any BPF program (EPERM: Operation not permitted); needs root and BPF"


# ---------------------------------------------------------------- the mode choice


class Gauge:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def labels(self, mode: str) -> Any:
        values = self.values

        class Child:
            def set(self, v: float) -> None:
                values[mode] = v
        return Child()


class Metrics:
    def __init__(self) -> None:
        self.g = Gauge()

    def gauge(self, name: str, help: str, labels: list[str]) -> Gauge:
        assert (name, labels) == ("otelgo_ebpf_propagation_mode", ["mode"])
        return self.g


class FakeSkMsg:
    def __init__(self, ok: bool) -> None:
        self.ok, self.cgroup, self.started = ok, "/sys/fs/cgroup", False

    def __call__(self, pin_dir: str) -> FakeSkMsg:
        return self

    def start(self) -> None:
        if not self.ok:
            raise PropagationError("no cgroup v2 hierarchy mounted (sock_ops needs one)")
        self.started = True

    def stop(self) -> None:
        self.started = False


ALLOWED = probe_write.Capability(True, "a test program calling bpf_probe_write_user loaded")
REFUSED = probe_write.Capability(
    False, "the kernel refuses bpf_probe_write_user (verifier: program of this type cannot use helper "
           "bpf_probe_write_user#36); kernel lockdown likely", "program of this type cannot use helper "
                                                              "bpf_probe_write_user#36")


def run_choose(requested: str, cap: probe_write.Capability, skmsg_ok: bool,
               caplog: pytest.LogCaptureFixture) -> tuple[str, dict[str, float], list[tuple[int, str]], FakeSkMsg]:
    m, sk = Metrics(), FakeSkMsg(skmsg_ok)
    log = logging.getLogger("test.propagation")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.propagation"):
        c = choose(requested, log, m, pin_dir="/nonexistent", probe_write_check=lambda: cap, make_skmsg=sk)
    return c.mode, m.g.values, [(r.levelno, r.getMessage()) for r in caplog.records], sk


def test_explicit_probe_write_chosen_where_the_kernel_allows_it(caplog: pytest.LogCaptureFixture) -> None:
    mode, gauge, logs, sk = run_choose("probe_write", ALLOWED, True, caplog)
    assert mode == "probe_write" and not sk.started          # sk_msg not even started
    assert gauge == {"probe_write": 1, "sk_msg": 0, "stitch": 0, "off": 0}
    assert logs == [(logging.INFO, "propagation mode probe_write (requested probe_write): a test program "
                                   "calling bpf_probe_write_user loaded")]


def test_auto_prefers_sk_msg_and_never_test_loads_when_it_attaches(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> probe_write.Capability:
        raise AssertionError("auto test-loaded probe_write although sk_msg attached")
    m, sk = Metrics(), FakeSkMsg(True)
    with caplog.at_level(logging.INFO, logger="test.propagation"):
        c = choose("auto", logging.getLogger("test.propagation"), m, probe_write_check=boom, make_skmsg=sk)
    assert c.mode == "sk_msg" and sk.started
    assert m.g.values == {"probe_write": 0, "sk_msg": 1, "stitch": 0, "off": 0}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "propagation mode sk_msg (requested auto): sock_ops on /sys/fs/cgroup and sk_msg attached")]


def test_auto_without_sk_msg_is_probe_write_where_allowed(caplog: pytest.LogCaptureFixture) -> None:
    mode, gauge, logs, sk = run_choose("auto", ALLOWED, False, caplog)
    assert mode == "probe_write" and not sk.started
    assert gauge == {"probe_write": 1, "sk_msg": 0, "stitch": 0, "off": 0}
    assert logs == [(logging.INFO, "propagation mode probe_write (requested auto): a test program calling "
                                   "bpf_probe_write_user loaded [sk_msg: no cgroup v2 hierarchy mounted "
                                   "(sock_ops needs one)]")]


def test_auto_without_sk_msg_on_a_locked_down_kernel_is_stitch(caplog: pytest.LogCaptureFixture) -> None:
    mode, gauge, logs, _ = run_choose("auto", REFUSED, False, caplog)
    assert mode == "stitch" and gauge == {"probe_write": 0, "sk_msg": 0, "stitch": 1, "off": 0}
    assert logs == [(logging.INFO, "propagation mode stitch (requested auto): fallback [sk_msg: no cgroup v2 "
                                   "hierarchy mounted (sock_ops needs one); probe_write: " + REFUSED.reason + "]")]


def test_explicit_probe_write_refused_falls_back_in_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    mode, gauge, logs, _ = run_choose("probe_write", REFUSED, True, caplog)
    assert mode == "sk_msg" and gauge["sk_msg"] == 1 and gauge["probe_write"] == 0
    assert logs[0] == (logging.WARNING, f"propagation: probe_write unavailable, {REFUSED.reason}: falling back to "
                                        "sk_msg")
    assert [lv for lv, _ in logs] == [logging.WARNING, logging.INFO]


def test_explicit_probe_write_without_sk_msg_falls_back_to_stitch(caplog: pytest.LogCaptureFixture) -> None:
    mode, gauge, logs, _ = run_choose("probe_write", REFUSED, False, caplog)
    assert mode == "stitch" and gauge == {"probe_write": 0, "sk_msg": 0, "stitch": 1, "off": 0}
    assert logs[0] == (logging.WARNING, f"propagation: probe_write unavailable, {REFUSED.reason}: falling back to "
                                        "stitch")


@pytest.mark.parametrize("requested", ["sk_msg", "stitch", "off"])
def test_other_modes_never_test_load(requested: str, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> probe_write.Capability:
        raise AssertionError("probe_write test-loaded for mode " + requested)
    c = choose(requested, logging.getLogger("t"), None, probe_write_check=boom, make_skmsg=FakeSkMsg(True))
    assert c.mode == requested


# ---------------------------------------------------------------- the writer's decisions, in C

HARNESS = r"""
typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;
#define __always_inline inline __attribute__((always_inline))
struct trace_ctx {
    u8 trace_id[16];
    u8 span_id[8];
    u8 parent_span_id[8];
    u8 flags;
    u8 remote_parent;
    u8 pad[6];
};
#include "traceparent_line.h"
void format_line(const struct trace_ctx *tc, char *out) { tp_format_line(tc, out); }
int room(u64 ptr, s64 len, s64 cap, s64 n, u64 err) { return pw_room(ptr, len, cap, n, err); }
int is_tp(const char *k, s64 len) { return tp_is_traceparent_key(k, len); }
int line_len(void) { return TP_LINE_LEN; }
"""


class TraceCtx(ctypes.Structure):
    _fields_ = [("trace_id", ctypes.c_uint8 * 16), ("span_id", ctypes.c_uint8 * 8),
                ("parent_span_id", ctypes.c_uint8 * 8), ("flags", ctypes.c_uint8),
                ("remote_parent", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 6)]


@pytest.fixture(scope="module")
def line_h(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C compiler (setup installs gcc)")
        pytest.skip("no C compiler (never skipped under CI=true)")
    d = tmp_path_factory.mktemp("pwline")
    (d / "h.c").write_text(HARNESS)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-I{BPF_DIR}",
                    "-o", str(d / "h.so"), str(d / "h.c")], check=True)
    lib = ctypes.CDLL(str(d / "h.so"))
    lib.room.argtypes = [ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint64]
    lib.is_tp.argtypes = [ctypes.c_char_p, ctypes.c_int64]
    return lib


def test_line_is_the_w3c_traceparent_header(line_h: Any) -> None:
    tid, sid = bytes(range(0xA0, 0xB0)), bytes.fromhex("00ff10e7b7ad6b71")
    tc = TraceCtx()
    tc.trace_id[:] = list(tid)
    tc.span_id[:] = list(sid)
    tc.flags = 1
    out = ctypes.create_string_buffer(80)
    line_h.format_line(ctypes.byref(tc), out)
    assert line_h.line_len() == 70
    assert out.raw[:70] == f"traceparent: 00-{tid.hex()}-{sid.hex()}-01\r\n".encode()
    assert out.raw[70:] == b"\0" * 10                      # nothing past the line
    tc.flags = 0xA0
    line_h.format_line(ctypes.byref(tc), out)
    assert out.raw[66:70] == b"a0\r\n"


# (ptr, len, cap, n, err itab) -> 0 write, 9 PW_NO_ROOM, 12 PW_WRITER_STATE
ROOM = [
    ((0x1000, 4096, 4096, 0, 0), 0),
    ((0x1000, 4096, 4096, 4026, 0), 0),        # exactly 70 free: the line fills the buffer
    ((0x1000, 4096, 4096, 4027, 0), 9),        # 69 free
    ((0x1000, 4096, 4096, 4096, 0), 9),
    ((0x1000, 4096, 8192, 4030, 0), 9),        # bufio fills only up to len(buf), never cap
    ((0x1000, 4096, 4096, 10, 0x7b0000), 12),  # a sticky write error: Go would send nothing
    ((0, 4096, 4096, 0, 0), 12),               # no buffer
    ((0x1000, 4096, 4096, -1, 0), 12),         # n < 0: not a bufio.Writer we understand
    ((0x1000, 4096, 4096, 5000, 0), 12),       # n > len
    ((0x1000, 8192, 4096, 0, 0), 12),          # len > cap
]


@pytest.mark.parametrize(("args", "want"), ROOM)
def test_room_check(line_h: Any, args: tuple[int, int, int, int, int], want: int) -> None:
    assert line_h.room(*args) == want


@pytest.mark.parametrize(("key", "want"), [(b"Traceparent", 1), (b"traceparent", 1), (b"TRACEPARENT", 1),
                                           (b"Tracestate!", 0), (b"Traceparen", 0), (b"Traceparent-", 0),
                                           (b"X-Traceparen", 0)])
def test_existing_header_key(line_h: Any, key: bytes, want: int) -> None:
    assert line_h.is_tp(key, len(key)) == want


# ---------------------------------------------------------------- cflags and attach in probe_write mode


@pytest.fixture(scope="module")
def chain() -> tuple[GoBinary, str]:
    path = str(build_go_fixture("httpchain", "1.26"))
    return GoBinary.open(path), path


def test_cflags_compile_the_writer_only_in_probe_write_mode(chain: tuple[GoBinary, str]) -> None:
    gb, _ = chain
    plain = nc.cflags(gb, skmsg=True, pin_dir="/p")
    assert not any(f.startswith(("-DPROBE_WRITE", "-DBUFIO_N_POS", "-DITAB_BUFIOWRITER")) for f in plain)
    pw = nc.cflags(gb, skmsg=False, pin_dir="/p", probe_write=True)
    extra = [f for f in pw if f not in nc.cflags(gb, skmsg=False, pin_dir="/p")]
    itab = next(s.value for s in gb.elf.symbols() or [] if s.name == "go:itab.*bufio.Writer,io.Writer")
    assert extra == ["-DPROBE_WRITE=1", "-DBUFIO_ERR_POS=0", "-DBUFIO_BUF_POS=16", "-DBUFIO_N_POS=40",
                     f"-DITAB_BUFIOWRITER={itab}ULL", "-DSWISS_MAPS=1", "-DSWISS_DIRPTR_POS=16",
                     "-DSWISS_DIRLEN_POS=24", "-DSWISS_TABLE_GROUPS_POS=16", "-DSWISS_TABLE_MASK_POS=24",
                     "-DMAP_COUNT_POS=0"]
    with pytest.raises(ValueError, match="one at a time"):
        nc.cflags(gb, skmsg=True, pin_dir="/p", probe_write=True)


class FakeBPF:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes, int]] = []

    def attach_uprobe(self, name: str, addr: int, fn_name: bytes, pid: int) -> None:
        self.calls.append((addr, fn_name, pid))


def test_attach_hooks_write_subset_only_in_probe_write_mode(chain: tuple[GoBinary, str]) -> None:
    gb, path = chain
    off, on = FakeBPF(), FakeBPF()
    nc.attach(off, gb, path, 42)
    nc.attach(on, gb, path, 42, probe_write=True)
    assert b"uprobe_client_writeSubset" not in {f for _, f, _ in off.calls}
    assert on.calls[:len(off.calls)] == off.calls
    assert on.calls[len(off.calls):] == [(gb.entry_probe(nc.WRITE_SUBSET).addr, b"uprobe_client_writeSubset", 42)]


def test_sk_msg_is_stopped_when_the_choice_fails_after_it_attached() -> None:
    class BrokenMetrics(Metrics):
        def gauge(self, name: str, help: str, labels: list[str]) -> Gauge:
            raise RuntimeError("registry refused the gauge")
    sk = FakeSkMsg(True)
    with pytest.raises(RuntimeError, match="registry refused"):
        choose("auto", logging.getLogger("test.propagation"), BrokenMetrics(), make_skmsg=sk)
    assert not sk.started   # not left attached for a choice nobody holds


def test_connections_held_by_another_sk_msg_program_are_counted_and_said(caplog: pytest.LogCaptureFixture) -> None:
    from collector.component import ComponentID
    from collector.telemetry import ComponentTelemetry, SelfMetrics
    from receiver.ebpf_go.config import EbpfGoConfig
    from receiver.ebpf_go.propagation import PropagationChoice
    from receiver.ebpf_go.propagation.skmsg import SkMsgCounts
    from receiver.ebpf_go.receiver import factory

    class Counters:
        """The sk_msg program's counters as three successive reads find them."""
        reads = [({"injected": 2}, {"held_elsewhere": 0, "not_added": 0}),
                 ({"injected": 3}, {"held_elsewhere": 4, "not_added": 1}),
                 ({"injected": 3}, {"held_elsewhere": 9, "not_added": 1})]

        def counts(self) -> SkMsgCounts:
            outcomes, sockets = self.reads.pop(0)
            return SkMsgCounts(outcomes, 0, 0, sockets)

        def stop(self) -> None:
            pass

    metrics = SelfMetrics()
    r = factory.create(ComponentID("ebpf_go"), EbpfGoConfig(), ComponentTelemetry("receiver", "ebpf_go", metrics),
                       None)
    r.propagation = PropagationChoice("sk_msg", "test", Counters())  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        r._read_skmsg_counts()
    get = metrics.registry.get_sample_value
    assert get("otelgo_ebpf_propagation_injected_total") == 3
    assert get("otelgo_ebpf_propagation_connections_skipped_total", {"reason": "held_elsewhere"}) == 9
    assert get("otelgo_ebpf_propagation_connections_skipped_total", {"reason": "not_added"}) == 1
    # Said once (at most every 10 minutes), with what to look at.
    assert [rec.getMessage() for rec in caplog.records] == [
        "sk_msg propagation: another sk_msg program holds this host's client sockets (a second otelgo-collector, "
        "a CNI's socket acceleration, or a sock_ops attach left behind: `bpftool cgroup tree` lists them); 4 more "
        "client connections sent unchanged (their spans are joined by stitching)"]
