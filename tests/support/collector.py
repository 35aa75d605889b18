"""Start the real `otelgo-collector` binary as a subprocess for end-to-end tests."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(sys.executable).parent / "otelgo-collector"


def _term_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, however it dies (no stray collectors)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Any, timeout: float = 30.0, what: str = "") -> None:
    """Poll `cond` every 50 ms until it is true; AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def json_lines(path: Path, skip: int = 0) -> list[Any]:
    """The complete lines of a JSON-lines file another process is writing (the file exporter's
    output), from line `skip` on, parsed; a last line without its newline is still being written and
    is left for later."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[skip:-1]]


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


class CollectorProcess:
    """The collector running a config; `metrics_port` serves /metrics."""

    def __init__(self, config: dict[str, Any], workdir: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()) -> None:
        """`wrapper`: a command the collector runs under (e.g. `unshare -m ...`), which must exec it."""
        self.metrics_port = free_port()
        service = config.setdefault("service", {})
        service.setdefault("telemetry", {}).setdefault("metrics", {"address": f"127.0.0.1:{self.metrics_port}"})
        self.config_path = workdir / f"config-{self.metrics_port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"collector-{self.metrics_port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*wrapper, str(BINARY), "--config", str(self.config_path), *extra_args],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=workdir,
                                     preexec_fn=_term_with_parent)
        try:
            self.wait_ready()
        except Exception as e:
            self.stop()
            raise RuntimeError(f"collector did not start: {e}") from None

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Everything is ready" in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"collector not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> CollectorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
