"""The exporters' sending queue and retry loop, shared by `otlp` and `otlphttp`.

Mirrors the collector's exporterhelper: a bounded in-memory queue of requests (`sending_queue`: span
batches, or batches already encoded for the wire, anything with a `span_count()`) drained by
`num_consumers` threads, each sending with exponential backoff (`retry_on_failure`). Every span is
accounted for: sent (`otelcol_exporter_sent_spans`), dropped after sending failed
(`otelcol_exporter_send_failed_spans`) or refused at the door because the queue was full
(`otelcol_exporter_enqueue_failed_spans`). Log lines use the collector's texts and are rate-limited.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from pydantic import Field, model_validator

from collector.component import ComponentConfig
from collector.configtypes import Duration
from collector.errors import ConsumerError
from collector.telemetry import ComponentTelemetry

# How often the same drop/reject message may be logged (one line per burst, not per batch).
LOG_EVERY_SECONDS = 5.0


class RetryConfig(ComponentConfig):
    """`retry_on_failure` (config/configretry)."""

    enabled: bool = True
    initial_interval: Duration = 5.0
    randomization_factor: float = 0.5
    multiplier: float = 1.5
    max_interval: Duration = 30.0
    max_elapsed_time: Duration = 300.0  # 0 = retry forever

    @model_validator(mode="after")
    def _check(self) -> RetryConfig:
        if self.multiplier < 0:
            raise ValueError("multiplier value must be greater than or equal to 0")
        if self.randomization_factor < 0:
            raise ValueError("randomization_factor value must be greater than or equal to 0")
        if self.randomization_factor > 1:
            raise ValueError("randomization_factor value must be less than or equal to 1")
        if self.enabled and self.max_elapsed_time > 0:
            if self.max_elapsed_time < self.initial_interval:
                raise ValueError("'max_elapsed_time' must not be less than 'initial_interval'")
            if self.max_elapsed_time < self.max_interval:
                raise ValueError("'max_elapsed_time' must not be less than 'max_interval'")
        return self


class QueueConfig(ComponentConfig):
    """`sending_queue` (exporterhelper queuebatch.Config); in-memory, sized in batches (requests)."""

    enabled: bool = True
    num_consumers: int = 10
    queue_size: int = 1000
    sizer: str = Field(default="requests", pattern="^requests$")
    block_on_overflow: bool = False

    @model_validator(mode="after")
    def _check(self) -> QueueConfig:
        if self.enabled:
            if self.num_consumers <= 0:
                raise ValueError("`num_consumers` must be positive")
            if self.queue_size <= 0:
                raise ValueError("`queue_size` must be positive")
        return self


class ExportError(Exception):
    """A failed send. permanent: never retry. throttle: the server's requested delay (s), if any."""

    def __init__(self, message: str, permanent: bool = False, throttle: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.throttle = throttle


class Backoff:
    """cenkalti/backoff's ExponentialBackOff, as configured by retry_on_failure."""

    def __init__(self, cfg: RetryConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.current = cfg.initial_interval
        self.rng = rng or random.Random()

    def next(self) -> float:
        c = self.cfg
        delta = c.randomization_factor * self.current
        lo, hi = self.current - delta, self.current + delta
        value = lo + self.rng.random() * (hi - lo + 1e-9)
        if c.multiplier and self.current * c.multiplier < c.max_interval:
            self.current *= c.multiplier
        else:
            self.current = c.max_interval
        return value


class Request(Protocol):
    """What the queue holds: a SpanBatch, or an exporter's encoded form of one."""

    def span_count(self) -> int: ...


R = TypeVar("R", bound=Request)


class QueuedRetrySender(Generic[R]):
    """Queue + retry around a `send(request)` function that raises ExportError on failure."""

    def __init__(self, telemetry: ComponentTelemetry, send: Callable[[R], None], queue: QueueConfig,
                 retry: RetryConfig,
                 sleep_scale: float = 1.0) -> None:
        self.telemetry = telemetry
        self.log = telemetry.logger
        self.send = send
        self.qcfg = queue
        self.rcfg = retry
        exporter = telemetry.component_id
        m = telemetry.metrics
        self._sent = m.exporter_sent.labels(exporter)
        self._send_failed = m.exporter_send_failed.labels(exporter)
        self._enqueue_failed = m.exporter_enqueue_failed.labels(exporter)
        self._qsize = m.exporter_queue_size.labels(exporter, "traces")
        self._qcap = m.exporter_queue_capacity.labels(exporter, "traces")
        self._queue: deque[R] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._stopping = threading.Event()  # no more retries, drain what is queued
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._failure_suffix = "" if queue.enabled else " Try enabling sending_queue to survive temporary failures."
        self.sleep_scale = sleep_scale  # tests only: shrink backoff waits
        self._last_log: dict[str, float] = {}
        self._log_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self.qcfg.enabled:
            return
        self._qcap.set(self.qcfg.queue_size)
        self._qsize.set(0)
        for i in range(self.qcfg.num_consumers):
            t = threading.Thread(target=self._consumer, name=f"{self.telemetry.component_id}-sender-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self, timeout: float) -> None:
        """Stop retrying; send what is queued (one attempt each) until `timeout`; count the rest dropped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._stopping.set()
            self._cond.notify_all()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._qsize.set(0)
        dropped = sum(b.span_count() for b in left)
        if dropped:
            self._send_failed.inc(dropped)
            self.log.error("Exporting failed. Dropping data." + self._failure_suffix,
                           extra={"error": "shutdown timeout reached with data still queued",
                                  "dropped_items": dropped})

    def _log_once(self, key: str, level: int, msg: str, **fields: object) -> None:
        """One line per burst: the same message at most once every LOG_EVERY_SECONDS."""
        now = time.monotonic()
        with self._log_lock:
            if now - self._last_log.get(key, -1e18) < LOG_EVERY_SECONDS:
                return
            self._last_log[key] = now
        self.log.log(level, msg, extra=fields)

    # ------------------------------------------------------------ intake

    def consume(self, batch: R) -> None:
        n = batch.span_count()
        if n == 0:
            return
        if not self.qcfg.enabled:
            err = self._send_with_retry(batch)
            if err is not None:
                self._send_failed.inc(n)
                self._log_once("reject", logging.ERROR, "Exporting failed. Rejecting data." + self._failure_suffix,
                               error=err, rejected_items=n)
                raise ConsumerError(err, permanent=err.startswith("not retryable error"))
            return
        with self._cond:
            while self.qcfg.block_on_overflow and not self._closed and len(self._queue) >= self.qcfg.queue_size:
                self._cond.wait(0.1)
            if self._closed or len(self._queue) >= self.qcfg.queue_size:
                full = True
            else:
                full = False
                self._queue.append(batch)
                self._qsize.set(len(self._queue))
                self._cond.notify()
        if full:
            self._enqueue_failed.inc(n)
            self._log_once("queue_full", logging.ERROR, "Exporting failed. Rejecting data.",
                           error="sending queue is full", rejected_items=n)
            raise ConsumerError("sending queue is full")

    def queue_size(self) -> int:
        with self._cond:
            return len(self._queue)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._in_flight == 0

    # ------------------------------------------------------------ workers

    def _consumer(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue.popleft()
                self._qsize.set(len(self._queue))
                self._in_flight += 1
                self._cond.notify_all()
            try:
                n = batch.span_count()
                err = self._send_with_retry(batch)
                if err is not None:
                    self._send_failed.inc(n)
                    self._log_once("drop", logging.ERROR, "Exporting failed. Dropping data." + self._failure_suffix,
                                   error=err, dropped_items=n)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

    def _send_with_retry(self, batch: R) -> str | None:
        """Send until success (None) or give up (the collector's error text)."""
        n = batch.span_count()
        backoff = Backoff(self.rcfg)
        started = time.monotonic()
        while True:
            try:
                self.send(batch)
            except ExportError as e:
                if e.permanent:
                    return f"not retryable error: {e}"
                if not self.rcfg.enabled:
                    return str(e)
                if self._stopping.is_set():
                    return f"request will be cancelled before next retry: {e}"
                delay = backoff.next()
                if e.throttle is not None:
                    delay = max(delay, e.throttle)
                if self.rcfg.max_elapsed_time > 0 and \
                        time.monotonic() + delay > started + self.rcfg.max_elapsed_time:
                    return f"no more retries left: {e}"
                self._log_once("retry", logging.INFO, "Exporting failed. Will retry the request after interval.",
                               error=str(e), interval=f"{delay:.3f}s")
                if self._stopping.wait(delay * self.sleep_scale):
                    return f"request will be cancelled before next retry: {e}"
                continue
            self._sent.inc(n)
            return None
