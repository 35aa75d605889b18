"""Fixture binaries and oracles (`go version -m`, `go tool objdump`) for the gobinary tests.

Binaries are built once per content hash (tests/support/gobuild.py) and reused across runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.support.gobuild import CACHE, build_go_fixture, go_env, go_toolchain

GO_VERSIONS = ["1.19", "1.21", "1.23", "1.24", "1.26", "1.27"]
VARIANTS = ["plain", "stripped", "pie", "stripped-pie"]
UNSTRIPPED_TWIN = {"plain": "plain", "stripped": "plain", "pie": "pie", "stripped-pie": "pie",
                   "strip(1)": "plain", "pie-external+strip(1)": "pie-external"}
EXTERNAL_VERSIONS = ["1.21", "1.24", "1.27"]  # gcc-linked PIE: pclntab merged into .data.rel.ro (<= 1.25)

# Functions checked against objdump in every binary.
FUNCS = [
    "main.probeTarget", "main.deep", "main.manyReturns", "main.main", "main.linkHooks",
    "net/http.serverHandler.ServeHTTP", "net/http.(*Transport).roundTrip", "net/http.Header.writeSubset",
    "database/sql.(*DB).queryDC", "database/sql.(*DB).execDC", "net/http.(*conn).serve",
]


@cache
def fixture_binary(version: str, variant: str, name: str = "gobin_basic") -> Path:
    """Build (or reuse) a fixture. Extra variants: "strip(1)" is binutils `strip` of the plain build,
    "pie-external+strip(1)" of the gcc-linked PIE build."""
    if variant in ("strip(1)", "pie-external+strip(1)"):
        src = build_go_fixture(name, version, "plain" if variant == "strip(1)" else "pie-external")
        out = CACHE / "fixtures" / "stripped-by-binutils" / f"{src.parent.name}" / name
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            subprocess.run(["strip", "-o", str(tmp), str(src)], check=True)
            tmp.rename(out)
        return out
    return build_go_fixture(name, version, variant)


@dataclass(frozen=True)
class ObjFunc:
    name: str
    start: int
    end: int
    insns: tuple[tuple[int, int, str], ...]  # (addr, size, asm)

    @property
    def rets(self) -> list[int]:
        return [a for a, _, asm in self.insns if asm.split()[0] == "RET"]


_TEXT = re.compile(r"^TEXT (\S+)\(SB\)")
_INSN = re.compile(r"^\s+\S+\t+(0x[0-9a-f]+)\t+([0-9a-f]+)\t+(.*)$")


@cache
def objdump(version: str, binary: Path) -> dict[str, ObjFunc]:
    """`go tool objdump` (of the same Go version) for FUNCS: the oracle for ranges and returns."""
    go = go_toolchain(version)
    pattern = "^(" + "|".join(re.escape(f) for f in FUNCS) + ")$"
    p = subprocess.run([str(go), "tool", "objdump", "-s", pattern, str(binary)], capture_output=True,
                       text=True, env=go_env(go), check=True)
    out: dict[str, ObjFunc] = {}
    name = None
    insns: list[tuple[int, int, str]] = []

    def flush() -> None:
        if name is not None and insns:
            last = insns[-1]
            out[name] = ObjFunc(name, insns[0][0], last[0] + last[1], tuple(insns))

    for line in p.stdout.splitlines():
        m = _TEXT.match(line)
        if m:
            flush()
            name, insns = m.group(1), []
            continue
        m = _INSN.match(line)
        if m and name is not None:
            insns.append((int(m.group(1), 16), len(m.group(2)) // 2, m.group(3).strip()))
    flush()
    return out


@dataclass(frozen=True)
class GoVersionM:
    go_version: str
    path: str
    main: str
    deps: dict[str, str]  # path -> effective version (replacement's, "(devel)" for directories)


@cache
def go_version_m(version: str, binary: Path) -> GoVersionM:
    go = go_toolchain(version)
    p = subprocess.run([str(go), "version", "-m", str(binary)], capture_output=True, text=True,
                       env=go_env(go), check=True)
    lines = p.stdout.splitlines()
    gov = lines[0].split(": ", 1)[1].strip()
    path = main = ""
    deps: dict[str, str] = {}
    last = None
    for line in lines[1:]:
        parts = line.strip("\n").split("\t")[1:]
        if not parts:
            continue
        if parts[0] == "path":
            path = parts[1]
        elif parts[0] == "mod":
            main = parts[1]
        elif parts[0] == "dep":
            deps[parts[1]] = parts[2]
            last = parts[1]
        elif parts[0] == "=>" and last:
            deps[last] = parts[2] if len(parts) > 2 and parts[2] else "(devel)"
    return GoVersionM(gov, path, main, deps)


def have_gcc() -> bool:
    return shutil.which("gcc") is not None


@pytest.fixture(scope="session")
def go127_stripped() -> Path:
    return fixture_binary("1.27", "stripped")
