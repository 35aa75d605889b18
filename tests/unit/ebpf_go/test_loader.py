"""Loader checks that do not need BPF: headers, privileges, messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from collector.errors import KernelError, PrivilegeError
from receiver.ebpf_go import loader
from tests.support.ci import skip_or_fail_in_ci


def test_stub_header_tree(tmp_path: Path) -> None:
    if not Path("/usr/include/linux/ptrace.h").exists():
        skip_or_fail_in_ci("linux-libc-dev not installed")
    d = loader.build_stub_headers(tmp_path / "k")
    assert (d / "include/linux/kconfig.h").read_text().startswith("#define CONFIG_BPF_SYSCALL 1")
    assert (d / "include/uapi/linux/ptrace.h").exists()
    assert (d / "include/uapi/linux/bpf.h").read_text().startswith("/*")  # BCC brings its own
    assert "LINUX_VERSION_CODE" in (d / "include/linux/version.h").read_text()
    assert loader.build_stub_headers(tmp_path / "k") == d  # built once


def test_explicit_kernel_headers_must_be_a_tree(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="not a kernel header tree"):
        loader.find_kernel_headers(str(tmp_path))


def test_auto_finds_something() -> None:
    _src, how = loader.find_kernel_headers("auto")
    assert "headers" in how


def test_privilege_message_names_capabilities(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    real_open = open

    def fake_open(path: object, *a: object, **k: object):  # type: ignore[no-untyped-def]
        return real_open(status if path == "/proc/self/status" else path, *a, **k)  # type: ignore[arg-type]
    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(PrivilegeError) as e:
        loader.check_privileges()
    msg = str(e.value)
    assert "CAP_BPF" in msg and "CAP_PERFMON" in msg and "CAP_SYS_ADMIN" in msg and "\n" not in msg


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root and BCC")
def test_compile_failure_names_the_compiler_error(tmp_path: Path) -> None:
    src = tmp_path / "bad.c"
    src.write_text('#include "go_types.h"\nint uprobe_x(struct pt_regs *ctx) { return undefined_thing; }\n')
    with pytest.raises(KernelError) as e:
        loader.compile_program(src, [], loader.find_kernel_headers("auto")[0])
    msg = str(e.value)
    assert "BPF compile of bad.c failed" in msg and "undefined_thing" in msg and "\n" not in msg
