"""`memory_limiter` processor: refuse data while the process uses too much memory.

As the collector's memorylimiterprocessor: a hard limit (`limit_mib`, or `limit_percentage` of the
machine's or cgroup's memory) and a soft limit = hard − spike (`spike_limit_mib`, default 20 % of the
limit, or `spike_limit_percentage`). Above the soft limit every batch is refused with a non-permanent
ConsumerError (`data refused due to high memory usage`), so receivers push back and exporters' queues
stop growing; above the hard limit a garbage collection is forced. Memory is the process's resident
set size (Python has no Go heap to read), measured at most once per `check_interval`, on the calling
thread (no thread of its own). Counted in otelcol_processor_memory_limiter_{accepted,refused}_spans.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable

from pydantic import model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Kind, Processor
from collector.configtypes import Duration
from collector.errors import ConsumerError
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry, rss_bytes

MIB = 1 << 20
ERR_DATA_REFUSED = "data refused due to high memory usage"


class Config(ComponentConfig):
    check_interval: Duration = 0.0
    limit_mib: int = 0
    spike_limit_mib: int = 0
    limit_percentage: int = 0
    spike_limit_percentage: int = 0
    min_gc_interval_when_soft_limited: Duration = 10.0
    min_gc_interval_when_hard_limited: Duration = 0.0

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.check_interval <= 0:
            raise ValueError("'check_interval' must be greater than zero")
        if self.limit_mib == 0 and self.limit_percentage == 0:
            raise ValueError("'limit_mib' or 'limit_percentage' must be greater than zero")
        if self.limit_mib > 0:
            if self.spike_limit_mib >= self.limit_mib:
                raise ValueError("'spike_limit_mib' must be smaller than 'limit_mib'")
        else:
            if not (0 < self.limit_percentage <= 100 and 0 <= self.spike_limit_percentage <= 100):
                raise ValueError("'limit_percentage' and 'spike_limit_percentage' must be greater than zero "
                                 "and less than or equal to hundred")
            if self.spike_limit_percentage >= self.limit_percentage:
                raise ValueError("'spike_limit_percentage' must be smaller than 'limit_percentage'")
        return self


def total_memory_bytes() -> int:
    """The cgroup's memory limit when set, else the machine's memory."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) < 1 << 60:
                return int(text)
        except OSError:
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def limits(cfg: Config, total: int | None = None) -> tuple[int, int]:
    """(hard, soft) limits in bytes."""
    if cfg.limit_mib > 0:
        hard = cfg.limit_mib * MIB
        spike = cfg.spike_limit_mib * MIB if cfg.spike_limit_mib else hard // 5
    else:
        total = total if total is not None else total_memory_bytes()
        hard = total * cfg.limit_percentage // 100
        spike = total * cfg.spike_limit_percentage // 100
    return hard, hard - spike


class MemoryLimiterProcessor(Processor):
    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer,
                 config: Config, usage: Callable[[], int] = rss_bytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.config = config
        self.hard, self.soft = limits(config)
        self.usage = usage
        self.clock = clock
        self.collect_garbage: Callable[[], object] = gc.collect
        self.refusing = False
        self._last_check = -1e18
        self._last_gc = -1e18
        self._lock = threading.Lock()
        m = telemetry.metrics
        self._accepted = m.counter("otelcol_processor_memory_limiter_accepted_spans",
                                   "Number of spans passed on by the memory limiter", ["processor"]).labels(str(id))
        self._refused = m.counter("otelcol_processor_memory_limiter_refused_spans",
                                  "Number of spans refused by the memory limiter", ["processor"]).labels(str(id))

    def check(self) -> None:
        """Measure and update the refusing state (at most once per check_interval unless forced)."""
        now = self.clock()
        with self._lock:
            if now - self._last_check < self.config.check_interval:
                return
            self._last_check = now
            used = self.usage()
            log = self.telemetry.logger
            # As the collector: a forced GC above either limit, spaced by that limit's interval.
            over, limit, interval = (("hard", self.hard, self.config.min_gc_interval_when_hard_limited)
                                     if used > self.hard else
                                     ("soft", self.soft, self.config.min_gc_interval_when_soft_limited))
            if used > limit and now - self._last_gc >= interval:
                log.warning(f"Memory usage is above {over} limit. Forcing a GC.",
                            extra={"cur_mem_mib": used // MIB, f"{over}_limit_mib": limit // MIB})
                self.collect_garbage()
                self._last_gc = now
                used = self.usage()
            was = self.refusing
            self.refusing = used > self.soft
            if self.refusing and not was:
                log.warning("Memory usage is above soft limit. Refusing data.",
                            extra={"cur_mem_mib": used // MIB, "soft_limit_mib": self.soft // MIB})
            elif was and not self.refusing:
                log.info("Memory usage back within limits. Resuming normal operation.",
                         extra={"cur_mem_mib": used // MIB})

    def consume(self, batch: SpanBatch) -> None:
        n = batch.span_count()
        self.check()
        if self.refusing:
            self._refused.inc(n)
            raise ConsumerError(ERR_DATA_REFUSED, permanent=False)
        self._accepted.inc(n)
        self.next_consumer.consume(batch)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> MemoryLimiterProcessor:
    return MemoryLimiterProcessor(id, telemetry, next_consumer, config)


factory = Factory(
    type="memory_limiter", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
    description="Refuses data while memory use is above the soft limit.",
)
