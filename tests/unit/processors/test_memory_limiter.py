"""memory_limiter: limits, refusing above the soft limit with a non-permanent error, recovery."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from collector.component import ComponentID
from collector.errors import ConsumerError
from collector.telemetry import ComponentTelemetry, SelfMetrics
from processors import memory_limiter
from processors.memory_limiter import MIB, Config, MemoryLimiterProcessor, limits
from tests.unit.processors.helpers import Sink, one, span


@pytest.mark.parametrize("cfg, message", [
    ({"limit_mib": 100}, "'check_interval' must be greater than zero"),
    ({"check_interval": "1s"}, "'limit_mib' or 'limit_percentage' must be greater than zero"),
    ({"check_interval": "1s", "limit_mib": 100, "spike_limit_mib": 100}, "'spike_limit_mib' must be smaller than 'limit_mib'"),
    ({"check_interval": "1s", "limit_percentage": 50, "spike_limit_percentage": 60},
     "'spike_limit_percentage' must be smaller than 'limit_percentage'"),
    ({"check_interval": "1s", "limit_percentage": 150}, "less than or equal to hundred"),
])
def test_config_errors(cfg, message):
    with pytest.raises(ValidationError) as ei:
        Config.model_validate(cfg)
    assert message in str(ei.value)


def test_limits():
    assert limits(Config.model_validate({"check_interval": "1s", "limit_mib": 1000})) == (1000 * MIB, 800 * MIB)
    assert limits(Config.model_validate({"check_interval": "1s", "limit_mib": 1000, "spike_limit_mib": 100})) == \
        (1000 * MIB, 900 * MIB)
    assert limits(Config.model_validate({"check_interval": "1s", "limit_percentage": 50,
                                         "spike_limit_percentage": 10}), total=1000 * MIB) == (500 * MIB, 400 * MIB)


def test_refuses_above_soft_limit_and_recovers():
    usage = {"v": 100 * MIB}
    clock = {"t": 0.0}
    sink = Sink()
    t = ComponentTelemetry("processor", "memory_limiter", SelfMetrics())
    cfg = Config.model_validate({"check_interval": "1s", "limit_mib": 1000, "spike_limit_mib": 200})
    p = MemoryLimiterProcessor(ComponentID("memory_limiter"), t, sink, cfg, usage=lambda: usage["v"],
                               clock=lambda: clock["t"])
    p.consume(one(span()))
    usage["v"] = 850 * MIB  # above soft (800), below hard
    p.consume(one(span()))  # not re-measured before check_interval
    clock["t"] += 1.0
    with pytest.raises(ConsumerError) as ei:
        p.consume(one(span()))
    assert str(ei.value) == "data refused due to high memory usage" and ei.value.permanent is False
    usage["v"] = 500 * MIB
    with pytest.raises(ConsumerError):
        p.consume(one(span()))  # still refusing until the next check
    clock["t"] += 1.0
    p.consume(one(span()))
    assert len(sink.batches) == 3
    reg = t.metrics.registry
    assert reg.get_sample_value("otelcol_processor_memory_limiter_refused_spans_total",
                                {"processor": "memory_limiter"}) == 2
    assert reg.get_sample_value("otelcol_processor_memory_limiter_accepted_spans_total",
                                {"processor": "memory_limiter"}) == 3


def test_factory_uses_process_memory():
    cfg = Config.model_validate({"check_interval": "1s", "limit_mib": 1 << 20})
    sink = Sink()
    p = memory_limiter.factory.create(ComponentID("memory_limiter"), cfg,
                                      ComponentTelemetry("processor", "memory_limiter", SelfMetrics()), sink)
    p.consume(one(span()))
    assert len(sink.batches) == 1
    tiny = Config.model_validate({"check_interval": "1s", "limit_mib": 2, "spike_limit_mib": 1})
    p2 = memory_limiter.factory.create(ComponentID("memory_limiter"), tiny,
                                       ComponentTelemetry("processor", "memory_limiter", SelfMetrics()), sink)
    with pytest.raises(ConsumerError):
        p2.consume(one(span()))


def test_forced_gc_above_each_limit_spaced_by_that_limits_interval():
    """min_gc_interval_when_soft_limited / _hard_limited: a GC above the soft limit at most every 10 s
    (the default), above the hard limit at every check (default 0)."""
    usage = {"v": 850 * MIB}
    clock = {"t": 0.0}
    cfg = Config.model_validate({"check_interval": "1s", "limit_mib": 1000, "spike_limit_mib": 200})
    p = MemoryLimiterProcessor(ComponentID("memory_limiter"), ComponentTelemetry("processor", "m", SelfMetrics()),
                               Sink(), cfg, usage=lambda: usage["v"], clock=lambda: clock["t"])
    gcs: list[float] = []
    p.collect_garbage = lambda: gcs.append(clock["t"])
    for _ in range(12):  # above soft only, checked every second for 12 s
        p.check()
        clock["t"] += 1.0
    assert gcs == [0.0, 10.0]
    usage["v"] = 1100 * MIB  # above hard: every check
    for _ in range(3):
        p.check()
        clock["t"] += 1.0
    assert gcs == [0.0, 10.0, 12.0, 13.0, 14.0]
    slow = Config.model_validate({"check_interval": "1s", "limit_mib": 1000, "spike_limit_mib": 200,
                                  "min_gc_interval_when_soft_limited": "0s"})
    p2 = MemoryLimiterProcessor(ComponentID("m2"), ComponentTelemetry("processor", "m2", SelfMetrics()),
                                Sink(), slow, usage=lambda: 850 * MIB, clock=lambda: clock["t"])
    gcs2: list[float] = []
    p2.collect_garbage = lambda: gcs2.append(clock["t"])
    p2.check()
    clock["t"] += 1.0
    p2.check()
    assert len(gcs2) == 2
