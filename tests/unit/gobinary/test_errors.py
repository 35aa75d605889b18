"""Files that are not usable Go executables give one BinaryError with a clear message, nothing else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from receiver.ebpf_go.gobinary import BinaryError, GoBinary

from .conftest import fixture_binary

REPO = Path(__file__).resolve().parents[3]


def _open_all(path: Path | str) -> None:
    """Open and exercise everything; only BinaryError may escape."""
    b = GoBinary.open(path)
    for name in ("main.deep", "net/http.serverHandler.ServeHTTP"):
        if b.function(name) is not None:
            b.return_sites(name)
            b.entry_probe(name)
    b.struct_offset("net/http.Request", "Method")


def _msg(path: Path | str) -> str:
    with pytest.raises(BinaryError) as ei:
        _open_all(path)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    return msg


def test_not_go(tmp_path: Path) -> None:
    assert "not a Go executable" in _msg("/bin/ls")
    # The receiver counts it as not_go (skipped) by this type, not by the message's words.
    from receiver.ebpf_go.gobinary import NotGoBinary

    with pytest.raises(NotGoBinary):
        _open_all("/bin/ls")
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(BinaryError) as ei:
        _open_all(p)
    assert not isinstance(ei.value, NotGoBinary)


def test_empty(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    assert "empty" in _msg(p)


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "script.sh"
    p.write_text("#!/bin/sh\necho hi\n")
    assert "not an ELF" in _msg(p)


def test_directory(tmp_path: Path) -> None:
    assert "directory" in _msg(tmp_path)


def test_missing(tmp_path: Path) -> None:
    assert "no such file" in _msg(tmp_path / "nope")


def test_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"\x7fELF")
    p.chmod(0)
    if os.geteuid() != 0:
        assert "permission" in _msg(p)
        return
    # Root reads any file: check as an unprivileged user instead (as under CI, which runs as root).
    tmp_path.chmod(0o755)
    code = ("import sys; from receiver.ebpf_go.gobinary import GoBinary, BinaryError\n"
            "try:\n    GoBinary.open(sys.argv[1])\nexcept BinaryError as e:\n    print(e)\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                        code, str(p)], capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert "permission" in r.stdout.lower(), r.stdout + r.stderr


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.3, 0.6, 0.9, 0.999])
def test_truncated(tmp_path: Path, fraction: float) -> None:
    src = fixture_binary("1.24", "stripped")
    data = src.read_bytes()
    p = tmp_path / "trunc"
    p.write_bytes(data[: int(len(data) * fraction)])
    assert _msg(p)


def test_32bit_and_big_endian(tmp_path: Path) -> None:
    data = bytearray(fixture_binary("1.24", "stripped").read_bytes()[:4096])
    data[4] = 1
    (tmp_path / "a").write_bytes(bytes(data))
    assert "32-bit" in _msg(tmp_path / "a")
    data[4], data[5] = 2, 2
    (tmp_path / "b").write_bytes(bytes(data))
    assert "big-endian" in _msg(tmp_path / "b")


def test_corrupted_regions(tmp_path: Path) -> None:
    """Overwrite the headers, the buildinfo and the pclntab with junk: BinaryError or a sane result."""
    src = fixture_binary("1.24", "stripped")
    base = GoBinary.open(src)
    img = base.elf
    regions = []
    for name in (".go.buildinfo", ".gopclntab"):
        s = img.section(name)
        assert s is not None
        regions.append((s.offset, min(s.size, 4096)))
    regions += [(0x10, 48), (0x40, 200)]  # ELF header fields, program headers
    for i, (off, n) in enumerate(regions):
        data = bytearray(src.read_bytes())
        data[off : off + n] = bytes((j * 37 + 11) % 256 for j in range(n))
        p = tmp_path / f"c{i}"
        p.write_bytes(bytes(data))
        try:
            _open_all(p)
        except BinaryError as e:
            assert str(e) and "\n" not in str(e)


def test_copy_outside_cache(tmp_path: Path) -> None:
    dst = tmp_path / "server"
    shutil.copy(fixture_binary("1.27", "stripped"), dst)
    b = GoBinary.open(dst)
    assert b.path == str(dst) and b.go_version.startswith("go1.27")
