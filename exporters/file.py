"""`file` exporter: OTLP/JSON lines, one ExportTraceServiceRequest per line, as the collector's writes."""

from __future__ import annotations

import threading
from typing import IO, Literal

from pydantic import Field

from collector.component import ComponentConfig, ComponentID, Exporter, Factory, Host, Kind
from collector.configtypes import Duration
from collector.errors import UserError
from collector.spans import SpanBatch, to_json_line
from collector.telemetry import ComponentTelemetry


class Config(ComponentConfig):
    path: str = Field(description="file to write; one OTLP/JSON ExportTraceServiceRequest per line")
    format: Literal["json"] = Field("json", description="only json (OTLP/JSON) is supported")
    append: bool = Field(False, description="append to an existing file instead of truncating it")
    flush_interval: Duration = Field(1.0, description="how often buffered lines reach the file; 0 = every batch")


class FileExporter(Exporter):
    def __init__(self, id: ComponentID, config: Config, telemetry: ComponentTelemetry) -> None:
        super().__init__(id, telemetry)
        self.config = config
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        m = telemetry.metrics
        self._sent = m.exporter_sent.labels(exporter=str(id))
        self._failed = m.exporter_send_failed.labels(exporter=str(id))

    def start(self, host: Host) -> None:
        try:
            self._file = open(self.config.path, "a" if self.config.append else "w", encoding="utf-8")
        except OSError as e:
            raise UserError(f"exporters::{self.id}::path: cannot open {self.config.path!r}: {e.strerror}") from None
        if self.config.flush_interval > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name=f"file-{self.id}", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.config.flush_interval):
            with self._lock:
                if self._file is not None:
                    self._file.flush()

    def consume(self, batch: SpanBatch) -> None:
        n = batch.span_count()
        line = to_json_line(batch) + "\n"
        with self._lock:
            if self._file is None:
                self._failed.inc(n)
                return
            try:
                self._file.write(line)
                if self.config.flush_interval == 0:
                    self._file.flush()
            except OSError as e:
                self._failed.inc(n)
                self.telemetry.warn_once_per("write", 10, f"cannot write to {self.config.path}: {e.strerror}")
                return
        self._sent.inc(n)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry) -> FileExporter:
    return FileExporter(id, config, telemetry)


factory = Factory(type="file", kind=Kind.EXPORTER, config_model=Config, create=_create, stability="alpha",
                  description="writes OTLP/JSON lines to a file")
