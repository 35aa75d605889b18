"""Many Go services at once, of several binaries (Go versions, stripped, PIE, gin, gRPC), for the
test and the benchmark of a host that runs many (tests/e2e/test_many_services.py,
benchmarks/many_services.py). Each service answers `get()` with one request that makes one server span.
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

from tests.support.collector import free_port, wait_for_port
from tests.support.gobuild import build_go_fixture
from tests.support.goserver import Server
from tests.support.grpcapp import GrpcApp

# (fixture, Go version, variant): six distinct binaries
MIX = [("httpserver", "1.24", "stripped"), ("httpserver", "1.27", "pie"), ("httpserver", "1.21", "plain"),
       ("httpchain", "1.26", "plain"), ("ginapp", "1.26", "stripped"), ("grpcapp", "1.26", "plain")]
PATHS = {"httpserver": "/hello", "httpchain": "/chain/many", "ginapp": "/items/7", "grpcapp": "/ping"}


class Service:
    def __init__(self, fixture: str, binary: Path) -> None:
        self.fixture = fixture
        self._server: Server | None = None
        self._grpc: GrpcApp | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if fixture == "grpcapp":
            self._grpc = GrpcApp(binary)
            self.pid, self.addr = self._grpc.pid, self._grpc.http_addr
        elif fixture == "httpchain":
            port = free_port()
            self._proc = subprocess.Popen([str(binary), "-name", "leaf", "-listen", f"127.0.0.1:{port}"],
                                          stderr=subprocess.DEVNULL)
            wait_for_port(port, proc=self._proc)
            self.pid, self.addr = self._proc.pid, f"127.0.0.1:{port}"
        else:
            self._server = Server(binary)
            self.pid, self.addr = self._server.pid, self._server.addr

    def get(self) -> None:
        with urllib.request.urlopen(f"http://{self.addr}{PATHS[self.fixture]}", timeout=10) as r:
            r.read()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self._grpc is not None:
            self._grpc.stop()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()


def start_services(per_binary: int, mix: list[tuple[str, str, str]] = MIX) -> list[Service]:
    """`per_binary` processes of each binary of `mix`; all stopped if one fails to start."""
    out: list[Service] = []
    try:
        for fixture, version, variant in mix:
            binary = build_go_fixture(fixture, version, variant)
            for _ in range(per_binary):
                out.append(Service(fixture, binary))
    except BaseException:
        for s in out:
            s.stop()
        raise
    return out
