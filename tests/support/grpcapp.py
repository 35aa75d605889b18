"""tests/fixtures/go/grpcapp run for a test: its gRPC and HTTP addresses, calls into it over both.

The fixture prints `GRPC <host:port>` and `HTTP <host:port>` once both listen (main.go says what
each method and endpoint does). gRPC calls from the test use grpcio with wrappers' StringValue, so
no generated code is needed on either side."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

# grpc-core's fork handlers abort a child forked while a channel is open (the collector the test
# starts next): no fork support, and channels made on first use.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
import grpc  # noqa: E402
from google.protobuf.wrappers_pb2 import StringValue  # noqa: E402

ECHO = "/otelgo.test.Echo/Echo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


class GrpcApp:
    def __init__(self, binary: Path, args: tuple[str, ...] = ()) -> None:
        """`args`: the fixture's flags, e.g. ("-target", other.grpc_addr) to call another server."""
        self.proc = subprocess.Popen([str(binary), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline(), self.proc.stdout.readline()]
        if not (lines[0].startswith("GRPC ") and lines[1].startswith("HTTP ")):
            self.stop()
            raise RuntimeError(f"grpcapp did not start: {lines!r}")
        self.grpc_addr, self.http_addr = lines[0].split()[1], lines[1].split()[1]
        self.grpc_port = int(self.grpc_addr.rsplit(":", 1)[1])
        self._channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.grpc_addr)
        return self._channel

    def http(self, path: str) -> str:
        """GET an HTTP endpoint of the fixture; its body (a grpc status code for the /call ones)."""
        with urllib.request.urlopen(f"http://{self.http_addr}{path}", timeout=10) as r:
            return str(r.read().decode())

    def echo(self, value: str, metadata: list[tuple[str, str]] | None = None,
             timeout: float | None = 10) -> tuple[grpc.StatusCode, str]:
        """One unary Echo call from this test process: (status code, reply or status message)."""
        call = self.channel.unary_unary(ECHO, request_serializer=StringValue.SerializeToString,
                                        response_deserializer=StringValue.FromString)
        try:
            reply = call(StringValue(value=value), metadata=metadata, timeout=timeout)
            return grpc.StatusCode.OK, str(reply.value)
        except grpc.RpcError as e:
            return e.code(), str(e.details())

    def health(self, metadata: list[tuple[str, str]] | None = None) -> bytes:
        """grpc.health.v1.Health/Check with an empty request (the message has no field we set): the
        response's bytes, b"\\x08\\x01" for SERVING."""
        call = self.channel.unary_unary(HEALTH_CHECK, request_serializer=lambda _: b"",
                                        response_deserializer=lambda b: b)
        return bytes(call(None, metadata=metadata, timeout=10))

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
