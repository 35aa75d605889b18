"""Self-telemetry: Prometheus metrics with the collector's names, logging, and the per-component handle.

Counters are prometheus_client Counters, so `otelcol_receiver_accepted_spans` is exposed as
`otelcol_receiver_accepted_spans_total`: the name users query in Prometheus and dashboards.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LOG_NAME = "otelgo"


class _ProcessCollector(Collector):
    """otelcol_process_* : uptime, CPU seconds and resident memory of this process."""

    def __init__(self, started: float) -> None:
        self._started = started

    def collect(self) -> Iterable[Metric]:
        up = CounterMetricFamily("otelcol_process_uptime", "Uptime of the process [s]")
        up.add_metric([], time.monotonic() - self._started)
        yield up
        ru = resource.getrusage(resource.RUSAGE_SELF)
        cpu = CounterMetricFamily("otelcol_process_cpu_seconds", "Total CPU user and system time in seconds")
        cpu.add_metric([], ru.ru_utime + ru.ru_stime)
        yield cpu
        rss = GaugeMetricFamily("otelcol_process_memory_rss", "Total physical memory (resident set size) [By]")
        rss.add_metric([], float(rss_bytes()))
        yield rss


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class SelfMetrics:
    """All metrics of one collector run, in one registry (no global state)."""

    def __init__(self) -> None:
        disable_created_metrics()  # the collector exposes no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = time.monotonic()
        r.register(_ProcessCollector(self.started))
        self.receiver_accepted = Counter(
            "otelcol_receiver_accepted_spans", "Number of spans successfully pushed into the pipeline.",
            ["receiver", "transport"], registry=r)
        self.receiver_refused = Counter(
            "otelcol_receiver_refused_spans", "Number of spans that could not be pushed into the pipeline.",
            ["receiver", "transport"], registry=r)
        self.processor_incoming = Counter(
            "otelcol_processor_incoming_items", "Number of items passed to the processor.",
            ["processor", "otel_signal"], registry=r)
        self.processor_outgoing = Counter(
            "otelcol_processor_outgoing_items", "Number of items emitted from the processor.",
            ["processor", "otel_signal"], registry=r)
        self.exporter_sent = Counter(
            "otelcol_exporter_sent_spans", "Number of spans successfully sent to destination.",
            ["exporter"], registry=r)
        self.exporter_send_failed = Counter(
            "otelcol_exporter_send_failed_spans", "Number of spans in failed attempts to send to destination.",
            ["exporter"], registry=r)
        self.exporter_enqueue_failed = Counter(
            "otelcol_exporter_enqueue_failed_spans", "Number of spans failed to be added to the sending queue.",
            ["exporter"], registry=r)
        self.exporter_queue_size = Gauge(
            "otelcol_exporter_queue_size", "Current size of the retry queue (in batches)",
            ["exporter", "data_type"], registry=r)
        self.exporter_queue_capacity = Gauge(
            "otelcol_exporter_queue_capacity", "Fixed capacity of the retry queue (in batches)",
            ["exporter", "data_type"], registry=r)
        self.batch_send_size = Histogram(
            "otelcol_processor_batch_batch_send_size", "Number of units in the batch",
            ["processor"], registry=r,
            buckets=(10, 25, 50, 75, 100, 250, 500, 750, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000,
                     9000, 10000, 20000, 30000, 50000, 100000))
        self.batch_size_trigger = Counter(
            "otelcol_processor_batch_batch_size_trigger_send",
            "Number of times the batch was sent due to a size trigger", ["processor"], registry=r)
        self.batch_timeout_trigger = Counter(
            "otelcol_processor_batch_timeout_trigger_send",
            "Number of times the batch was sent due to a timeout trigger", ["processor"], registry=r)
        self._extra: dict[str, Any] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A component-specific counter, created once and shared by every instance that asks."""
        with self._lock:
            m = self._extra.get(name)
            if m is None:
                m = Counter(name, doc, list(labels), registry=self.registry)
                self._extra[name] = m
            return m

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        with self._lock:
            m = self._extra.get(name)
            if m is None:
                m = Gauge(name, doc, list(labels), registry=self.registry)
                self._extra[name] = m
            return m


class ComponentTelemetry:
    """What a component gets to report with: its logger and the shared metrics, labelled by its id."""

    def __init__(self, kind: str, component_id: str, metrics: SelfMetrics) -> None:
        self.kind = kind
        self.component_id = component_id
        self.metrics = metrics
        self.logger = ComponentLogger(
            logging.getLogger(f"{LOG_NAME}.{kind}.{component_id}"),
            {"otelcol.component.id": component_id, "otelcol.component.kind": kind})
        self._rate_limit: dict[str, float] = {}

    def warn_once_per(self, key: str, seconds: float, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log a repeated warning at most once every `seconds` for the same key."""
        now = time.monotonic()
        if now - self._rate_limit.get(key, -1e18) >= seconds:
            self._rate_limit[key] = now
            self.logger.warning(msg, *args, **kwargs)


# ---------------------------------------------------------------- logging


class _ConsoleFormatter(logging.Formatter):
    """The collector's console shape: time, level, message, then fields as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = _fields(record)
        first, nl, rest = record.getMessage().partition("\n")
        line = f"{ts}\t{record.levelname.lower()}\t{first}"
        if fields:
            line += "\t" + json.dumps(fields, default=str)
        line += nl + rest
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "level": record.levelname.lower(),
            "ts": record.created,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS}


class ComponentLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger whose records carry the component's fields, merged with any `extra=` given."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def setup_logging(level: str = "info", encoding: str = "console") -> None:
    root = logging.getLogger(LOG_NAME)
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if encoding == "json" else _ConsoleFormatter())
    root.addHandler(handler)
    root.setLevel({"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                   "warning": logging.WARNING, "error": logging.ERROR}.get(level.lower(), logging.INFO))
    root.propagate = False


def service_logger() -> logging.Logger:
    return logging.getLogger(f"{LOG_NAME}.service")
