"""A Go HTTP server fixture (tests/fixtures/go/httpserver or one like it) run for a test.

The fixture prints `LISTENING <host:port>` on stdout once it accepts connections."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path


class Server:
    """The server process on a free port; `request` sends one HTTP/1.1 request with Connection: close."""

    def __init__(self, binary: Path, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        """`preexec_fn`: run in the child before the exec (e.g. to enter a cgroup)."""
        self.proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.startswith("LISTENING "), line
        self.addr = line.split()[1]
        host, port = self.addr.rsplit(":", 1)
        self.host, self.port, self.pid = host, int(port), self.proc.pid

    def raw(self, request: bytes) -> bytes:
        """Send one HTTP/1.1 request (Connection: close) and return the whole response."""
        with socket.create_connection((self.host, self.port), timeout=10) as s:
            s.sendall(request)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Connection: close",
                 "User-Agent: e2e-client/1.0"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return self.raw(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def get(self, path: str) -> None:
        """A GET through urllib (its own connection handling), the body read and dropped."""
        with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=5) as r:
            r.read()

    def byte_at(self, vaddr: int) -> int:
        """The byte of the running process's text at `vaddr` (0xCC while a uprobe sits there)."""
        with open(f"/proc/{self.pid}/mem", "rb") as f:
            f.seek(vaddr)
            return f.read(1)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
