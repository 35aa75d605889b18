"""`batch` processor: gather spans into bigger batches, sent on size or after a timeout."""

from __future__ import annotations

import threading
import time

from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Processor
from collector.configtypes import Duration
from collector.errors import ConsumerError
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry


class Config(ComponentConfig):
    send_batch_size: int = Field(8192, description="spans that trigger a send (a trigger, not a cap)")
    send_batch_max_size: int = Field(0, description="upper bound of a sent batch; larger ones are split; 0 = no cap")
    timeout: Duration = Field(0.2, description="send what is held after this long; 0 = send at once")
    metadata_keys: list[str] = Field([], description="accepted for compatibility; must stay empty")
    metadata_cardinality_limit: int = Field(1000, description="accepted for compatibility")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.send_batch_size < 0:
            raise ValueError("send_batch_size must not be negative")
        if self.send_batch_max_size and self.send_batch_max_size < self.send_batch_size:
            raise ValueError("send_batch_max_size must be greater or equal to send_batch_size")
        if self.metadata_keys:
            raise ValueError("metadata_keys is not supported: batches are not split by client metadata")
        return self


class BatchProcessor(Processor):
    def __init__(self, id: ComponentID, config: Config, telemetry: ComponentTelemetry,
                 next_consumer: Consumer) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.config = config
        self._pending: list[SpanBatch] = []
        self._count = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._send_lock = threading.Lock()  # keeps batches in order towards the next consumer
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None
        m = telemetry.metrics
        self._size_hist = m.batch_send_size.labels(processor=str(id))
        self._size_trigger = m.batch_size_trigger.labels(processor=str(id))
        self._timeout_trigger = m.batch_timeout_trigger.labels(processor=str(id))

    def start(self, host: Host) -> None:
        self._thread = threading.Thread(target=self._timer_loop, name=f"batch-{self.id}", daemon=True)
        self._thread.start()

    def consume(self, batch: SpanBatch) -> None:
        n = batch.span_count()
        if n == 0:
            return
        cfg = self.config
        with self._lock:
            self._pending.append(batch)
            self._count += n
            if cfg.timeout == 0 or (cfg.send_batch_size and self._count >= cfg.send_batch_size):
                taken = self._take()
            else:
                if self._deadline is None:
                    self._deadline = time.monotonic() + cfg.timeout
                    self._wake.notify()
                return
        self._size_trigger.inc()
        self._send(taken)

    def _take(self) -> SpanBatch:
        merged = SpanBatch.merge(self._pending)
        self._pending, self._count, self._deadline = [], 0, None
        return merged

    def _send(self, merged: SpanBatch) -> None:
        with self._send_lock:
            for part in merged.split(self.config.send_batch_max_size):
                self._size_hist.observe(part.span_count())
                try:
                    self.next_consumer.consume(part)
                except ConsumerError as e:
                    # Downstream already counted what it refused; this processor holds nothing more.
                    self.telemetry.warn_once_per("refused", 10, "Sender failed", extra={"error": str(e)})

    def _timer_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (self._deadline is None or time.monotonic() < self._deadline):
                    self._wake.wait(None if self._deadline is None else self._deadline - time.monotonic())
                if self._stopping:
                    return
                taken = self._take()
            if taken.resource_spans:
                self._timeout_trigger.inc()
                self._send(taken)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            taken = self._take()
        if self._thread is not None:
            self._thread.join(timeout)
        if taken.resource_spans:
            self._send(taken)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> BatchProcessor:
    return BatchProcessor(id, config, telemetry, next_consumer)


factory = Factory(type="batch", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
                  description="groups spans into batches by size or timeout")
