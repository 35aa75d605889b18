"""The shared queue/retry helper: backoff shape and accounting (sent + failed + enqueue_failed = offered)."""

from __future__ import annotations

import random
import threading

import pytest

from collector.errors import ConsumerError
from exporters.sending_queue import Backoff, ExportError, QueueConfig, QueuedRetrySender, RetryConfig
from tests.unit.exporters.backend import batch, metric, telemetry


def test_backoff_grows_by_multiplier_with_jitter_and_caps():
    b = Backoff(RetryConfig(), random.Random(1))
    values = [b.next() for _ in range(10)]
    centres = [5.0, 7.5, 11.25, 16.875, 25.3125, 30, 30, 30, 30, 30]
    for v, c in zip(values, centres, strict=True):
        assert c * 0.5 <= v <= c * 1.5 + 1e-6


def test_every_span_is_accounted_for():
    rng = random.Random(7)
    lock = threading.Lock()

    def flaky(b):
        with lock:
            r = rng.random()
        if r < 0.2:
            raise ExportError("boom", permanent=True)
        if r < 0.5:
            raise ExportError("later")

    t = telemetry()
    s = QueuedRetrySender(t, flaky, QueueConfig(num_consumers=3, queue_size=20),
                          RetryConfig(initial_interval="1ms", max_interval="2ms", max_elapsed_time="10ms"))
    s.start()
    offered = refused = 0
    for i in range(300):
        offered += 3
        try:
            s.consume(batch(3, start=i * 3))
        except ConsumerError:
            refused += 3
    s.shutdown(5)
    sent = metric(t, "otelcol_exporter_sent_spans")
    failed = metric(t, "otelcol_exporter_send_failed_spans")
    enq = metric(t, "otelcol_exporter_enqueue_failed_spans")
    assert enq == refused
    assert sent + failed + enq == offered
    assert sent > 0 and failed > 0


def test_retry_config_zero_max_elapsed_means_forever():
    RetryConfig(max_elapsed_time=0, initial_interval="100s")  # no error
    with pytest.raises(ValueError):
        RetryConfig(multiplier=-1)
