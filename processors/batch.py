"""`batch` processor: gather spans into bigger batches, sent on size or after a timeout.

As in the collector, batches leave from the processor's own thread, not the caller's: a receiver
that hands spans over (the eBPF reader, which must keep draining its ring buffers) is not held up
while a full batch is merged, encoded and exported. At most MAX_READY full batches wait for that
thread; beyond that `consume` blocks (backpressure, like the collector's channel), so memory
stays bounded.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Processor
from collector.configtypes import Duration
from collector.errors import ConsumerError
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry

MAX_READY = 2  # full batches waiting for the sender thread before consume() blocks


class Config(ComponentConfig):
    send_batch_size: int = Field(8192, description="spans that trigger a send (a trigger, not a cap)")
    send_batch_max_size: int = Field(0, description="upper bound of a sent batch; larger ones are split; 0 = no cap")
    timeout: Duration = Field(0.2, description="send what is held after this long; 0 = send at once")
    metadata_keys: list[str] = Field([], description="only empty (batches are not split by client metadata)")
    metadata_cardinality_limit: int = Field(1000, description="as in the collector, used only with metadata_keys")

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
        self._wake = threading.Condition(self._lock)    # the sender thread: a batch is ready or due
        self._space = threading.Condition(self._lock)   # callers: a ready slot was freed
        self._ready: deque[SpanBatch] = deque()         # full batches, oldest first
        self._send_lock = threading.Lock()  # keeps batches in order towards the next consumer
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None
        m = telemetry.metrics
        self._size_hist = m.batch_send_size.labels(processor=str(id))
        self._size_trigger = m.batch_size_trigger.labels(processor=str(id))
        self._timeout_trigger = m.batch_timeout_trigger.labels(processor=str(id))

    def start(self, host: Host) -> None:
        self._thread = threading.Thread(target=self._sender_loop, name=f"batch-{self.id}", daemon=True)
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
                while len(self._ready) >= MAX_READY and not self._stopping:
                    self._space.wait()
                if self._stopping:  # the sender thread is gone or going: send from here
                    ready_now = False
                else:
                    self._ready.append(taken)
                    self._wake.notify()
                    ready_now = True
            else:
                if self._deadline is None:
                    self._deadline = time.monotonic() + cfg.timeout
                    self._wake.notify()
                return
        self._size_trigger.inc()
        if not ready_now:
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

    def _sender_loop(self) -> None:
        """Sends full batches as they become ready, and what is held when the timeout expires."""
        while True:
            with self._lock:
                while (not self._ready and not self._stopping
                       and (self._deadline is None or time.monotonic() < self._deadline)):
                    self._wake.wait(None if self._deadline is None else self._deadline - time.monotonic())
                if self._ready:
                    taken, timed_out = self._ready.popleft(), False
                    self._space.notify()
                elif self._stopping:
                    return
                else:
                    taken, timed_out = self._take(), True
            if taken.resource_spans:
                if timed_out:
                    self._timeout_trigger.inc()
                self._send(taken)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            self._space.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)  # it sends every ready batch first
        with self._lock:
            left = list(self._ready) + [self._take()]
            self._ready.clear()
        for taken in left:
            if taken.resource_spans:
                self._send(taken)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> BatchProcessor:
    return BatchProcessor(id, config, telemetry, next_consumer)


factory = Factory(type="batch", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
                  description="groups spans into batches by size or timeout")
