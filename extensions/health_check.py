"""`health_check` extension: HTTP 200 while the pipelines run, 503 before and during shutdown."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import Field

from collector.component import ComponentConfig, ComponentID, Extension, Factory, Host, Kind
from collector.configtypes import Endpoint, split_host_port
from collector.errors import UserError
from collector.telemetry import ComponentTelemetry


class Config(ComponentConfig):
    endpoint: Endpoint = Field("localhost:13133", description="address to serve the health check on")
    path: str = Field("/", description="URL path of the check")
    response_body: dict[str, str] | None = Field(
        None, description="custom bodies: {healthy: ..., unhealthy: ...}")


class HealthCheck(Extension):
    def __init__(self, id: ComponentID, config: Config, telemetry: ComponentTelemetry) -> None:
        super().__init__(id, telemetry)
        self.config = config
        self._ready = False
        self._up_since: float | None = None
        self._server: ThreadingHTTPServer | None = None

    def _status(self) -> tuple[int, dict[str, Any]]:
        if self._ready and self._up_since is not None:
            up = time.time() - self._up_since
            return 200, {"status": "Server available",
                         "upSince": datetime.fromtimestamp(self._up_since, UTC).isoformat(),
                         "uptime": f"{up:.3f}s"}
        return 503, {"status": "Server not available"}

    def start(self, host: Host) -> None:
        ext = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] != ext.config.path:
                    self.send_error(404)
                    return
                code, body = ext._status()
                if ext.config.response_body:
                    text = ext.config.response_body.get("healthy" if code == 200 else "unhealthy", "")
                else:
                    text = json.dumps(body)
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        host_name, port = split_host_port(self.config.endpoint)
        try:
            self._server = ThreadingHTTPServer((host_name or "0.0.0.0", port), Handler)
        except OSError as e:
            raise UserError(f"extensions::{self.id}::endpoint: cannot listen on {self.config.endpoint}: "
                            f"{e.strerror}; choose a free host:port") from None
        threading.Thread(target=self._server.serve_forever, name=f"health-{self.id}", daemon=True).start()

    def ready(self) -> None:
        self._up_since = time.time()
        self._ready = True

    def not_ready(self) -> None:
        self._ready = False

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry) -> HealthCheck:
    return HealthCheck(id, config, telemetry)


factory = Factory(type="health_check", kind=Kind.EXTENSION, config_model=Config, create=_create,
                  stability="beta", description="HTTP health endpoint")
