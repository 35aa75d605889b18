"""Three Go services A -> B -> C over HTTP/1.1 (tests/fixtures/go/httpchain): each request to A at
`/chain/<id>` is passed on with its id, so a test finds the five spans one request caused."""

from __future__ import annotations

import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.collector import free_port, wait_for_port


@dataclass
class Chain:
    """A -> B -> C, each one httpchain process."""

    capture: Path | None = None    # -capture DIR: the exact bytes of every connection
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def role_of_pid(self) -> dict[int, str]:
        return {p.pid: name for name, p in self.procs.items()}

    def start(self, binary: Path) -> None:
        nxt = ""
        for name in ("C", "B", "A"):
            port = free_port()
            args = [str(binary), "-name", name, "-listen", f"127.0.0.1:{port}"]
            if self.capture is not None:
                args += ["-capture", str(self.capture)]
            if nxt:
                args += ["-next", nxt]
            self.procs[name] = subprocess.Popen(args, stderr=subprocess.DEVNULL)
            self.ports[name] = port
            wait_for_port(port, proc=self.procs[name])
            nxt = f"http://127.0.0.1:{port}/chain"

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()

    def get(self, rid: str, headers: dict[str, str] | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['A']}/chain/{rid}", headers=headers or {})
        with urllib.request.urlopen(req, timeout=20) as r:
            return bytes(r.read())
