"""Self-telemetry: Prometheus metrics with the collector's names, logging, and the per-component handle.

Counters are prometheus_client Counters, so `otelcol_receiver_accepted_spans` is exposed as
`otelcol_receiver_accepted_spans_total`: the name users query in Prometheus and dashboards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
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


def collector_version() -> str:
    try:
        return metadata.version("otelgo-collector")
    except metadata.PackageNotFoundError:
        return "0.0.0-dev"


def resource_attributes(configured: dict[str, Any] | None = None) -> dict[str, str]:
    """The self-telemetry resource: service.name/version/instance.id, then `telemetry::resource`
    on top (a null value removes an attribute, as in the collector)."""
    attrs: dict[str, Any] = {"service.name": "otelgo-collector", "service.version": collector_version(),
                             "service.instance.id": str(uuid.uuid4())}
    attrs.update(configured or {})
    return {k: str(v) for k, v in attrs.items() if v is not None}


def _label_name(key: str) -> str:
    """An attribute key as a Prometheus label (`service.name` → `service_name`), as the collector does."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    return f"key_{name}" if name[:1].isdigit() else name


class _TargetInfo(Collector):
    """target_info{service_name=...} = 1: the resource of this collector's own metrics."""

    def __init__(self, resource: dict[str, str]) -> None:
        self._labels = {_label_name(k): v for k, v in resource.items()}

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("target_info", "Target metadata", labels=list(self._labels))
        info.add_metric(list(self._labels.values()), 1.0)
        yield info


class SelfMetrics:
    """All metrics of one collector run, in one registry (no global state)."""

    def __init__(self, resource: dict[str, str] | None = None) -> None:
        disable_created_metrics()  # the collector exposes no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = time.monotonic()
        r.register(_ProcessCollector(self.started))
        self.resource = resource if resource is not None else resource_attributes()
        r.register(_TargetInfo(self.resource))
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


# Where our code sits: a record's caller is shown relative to it (`collector/service.py:88`).
_CODE_ROOT = Path(__file__).resolve().parents[1]


def _caller(record: logging.LogRecord) -> str:
    path = Path(record.pathname)
    try:
        where = str(path.resolve().relative_to(_CODE_ROOT))
    except ValueError:
        where = path.name
    return f"{where}:{record.lineno}"


def _level(record: logging.LogRecord) -> str:
    return "warn" if record.levelno == logging.WARNING else record.levelname.lower()  # zap's level names


class _Formatter(logging.Formatter):
    """What both encodings share: the configured caller, stacktrace and initial-field choices."""

    def __init__(self, *, caller: bool = True, stacktrace: bool = True,
                 initial_fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.caller, self.stacktrace = caller, stacktrace
        self.initial_fields = dict(initial_fields or {})

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        return {**self.initial_fields, **_fields(record)} if self.initial_fields else _fields(record)

    def trace(self, record: logging.LogRecord) -> str:
        return self.formatException(record.exc_info) if record.exc_info and self.stacktrace else ""


class _ConsoleFormatter(_Formatter):
    """The collector's console shape: time, level, caller, message, then fields as JSON."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = self.fields(record)
        first, nl, rest = record.getMessage().partition("\n")
        line = f"{ts}\t{_level(record)}\t"
        if self.caller:
            line += _caller(record) + "\t"
        line += first
        if fields:
            line += "\t" + json.dumps(fields, default=str)
        line += nl + rest
        trace = self.trace(record)
        return line + ("\n" + trace if trace else "")


class _JSONFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"level": _level(record), "ts": record.created}
        if self.caller:
            doc["caller"] = _caller(record)
        doc["msg"] = record.getMessage()
        doc.update(self.fields(record))
        trace = self.trace(record)
        if trace:
            doc["stacktrace"] = trace
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


class LogSampler(logging.Filter):
    """zap's sampler, as the collector configures it: per tick and per (level, message), the first
    `initial` records pass, then every `thereafter`-th (none when 0). A message repeated in a loop
    costs a few lines a tick instead of flooding the log."""

    def __init__(self, tick: float, initial: int, thereafter: int) -> None:
        super().__init__()
        self.tick, self.initial, self.thereafter = tick, initial, thereafter
        self._window = -1.0
        self._counts: dict[tuple[int, str], int] = {}
        self._last: logging.LogRecord | None = None
        self._last_kept = True
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            if record is self._last:  # the same record at the next output: count it once
                return self._last_kept
            window = record.created - record.created % self.tick
            if window != self._window or len(self._counts) >= 4096:  # bounded: a new tick starts afresh
                self._window, self._counts = window, {}
            key = (record.levelno, str(record.msg))
            n = self._counts.get(key, 0) + 1
            self._counts[key] = n
            kept = n <= self.initial or (self.thereafter > 0 and (n - self.initial) % self.thereafter == 0)
            self._last, self._last_kept = record, kept
            return kept


def open_log_outputs(paths: Sequence[str]) -> list[logging.Handler]:
    """`stderr`, `stdout` or a file path (appended to; `file://` accepted) per output, as zap's
    output_paths. OSError names the path that cannot be opened."""
    handlers: list[logging.Handler] = []
    for p in paths:
        if p == "stderr":
            handlers.append(logging.StreamHandler(sys.stderr))
        elif p == "stdout":
            handlers.append(logging.StreamHandler(sys.stdout))
        else:
            path = p[len("file://"):] if p.startswith("file://") else p
            try:
                handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
            except OSError as e:
                for h in handlers:
                    h.close()
                raise OSError(e.errno, f'cannot open log output "{p}": {e.strerror}') from None
    return handlers


def setup_logging(level: str = "info", encoding: str = "console", *, output_paths: Sequence[str] = ("stderr",),
                  caller: bool = True, stacktrace: bool = True, initial_fields: dict[str, Any] | None = None,
                  sampler: LogSampler | None = None) -> None:
    """Configure the `otelgo` log tree (service::telemetry::logs). OSError when an output cannot be opened."""
    handlers = open_log_outputs(output_paths)
    root = logging.getLogger(LOG_NAME)
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers.clear()
    fmt_cls = _JSONFormatter if encoding == "json" else _ConsoleFormatter
    formatter = fmt_cls(caller=caller, stacktrace=stacktrace, initial_fields=initial_fields)
    for handler in handlers:
        handler.setFormatter(formatter)
        if sampler is not None:
            handler.addFilter(sampler)  # on the handler: the logger's filter would miss child loggers' records
        root.addHandler(handler)
    root.setLevel({"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
                   "warning": logging.WARNING, "error": logging.ERROR}.get(level.lower(), logging.INFO))
    root.propagate = False


def service_logger() -> logging.Logger:
    return logging.getLogger(f"{LOG_NAME}.service")
