"""tail_sampling: when a trace is decided, what late spans do, eviction under num_traces, shutdown,
the self-metrics, and one-line config errors. (Every policy against contrib's processor, spans
spread over requests and receivers, is tests/e2e/test_tail_sampling_differential.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from collector.spans import STATUS_ERROR
from processors import tail_sampling as ts
from processors.tail_sampling.policies import ratio_threshold
from tests.unit.processors.helpers import make, one, span


def _proc(cfg: dict[str, Any], name: str = "tail_sampling") -> tuple[Any, Any, Any]:
    return make(ts, cfg, name)


ERRORS = [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]


def _value(t: Any, metric: str, **labels: str) -> float:
    return t.metrics.registry.get_sample_value(f"otelcol_processor_tail_sampling_{metric}", labels) or 0.0


def test_a_trace_is_decided_after_decision_wait_whole_and_its_late_spans_follow() -> None:
    p, sink, t = _proc({"decision_wait": "2s", "policies": ERRORS})
    p.consume(one(span("a", tid=1, status_code=STATUS_ERROR)))
    p.consume(one(span("b", tid=2)))
    p.consume(one(span("a2", tid=1), service="other"))       # same trace, another request and resource
    p._tick(rotate=True)
    p._tick(rotate=True)
    assert sink.spans() == []                                # 2 ticks: still waiting
    p._tick(rotate=True)
    assert sorted(s.name for s in sink.spans()) == ["a", "a2"]
    p.consume(one(span("late", tid=1)))                      # kept trace: at once
    p.consume(one(span("late", tid=2)))                      # dropped trace: dropped
    assert sorted(s.name for s in sink.spans()) == ["a", "a2", "late"]
    assert _value(t, "global_count_traces_sampled_total", sampled="true", decision="sampled") == 1
    assert _value(t, "global_count_traces_sampled_total", sampled="false", decision="not_sampled") == 1
    assert _value(t, "count_traces_sampled_total", policy="errors", sampled="true", decision="sampled") == 1
    assert _value(t, "new_trace_id_received_total") == 2
    assert _value(t, "sampling_policy_execution_count_total", policy="errors") == 2


def test_decision_caches_release_late_spans_and_free_the_trace() -> None:
    p, sink, t = _proc({"decision_wait": "1s", "policies": ERRORS,
                        "decision_cache": {"sampled_cache_size": 10, "non_sampled_cache_size": 10}})
    p.consume(one(span("a", tid=1, status_code=STATUS_ERROR)))
    p.consume(one(span("b", tid=2)))
    p._tick(rotate=True)
    p._tick(rotate=True)
    assert p.traces == {}                                    # both left memory: the caches decide now
    p.consume(one(span("late-a", tid=1)))
    p.consume(one(span("late-b", tid=2)))
    assert sorted(s.name for s in sink.spans()) == ["a", "late-a"]
    assert _value(t, "early_releases_from_cache_decision_total", sampled="true") == 1
    assert _value(t, "early_releases_from_cache_decision_total", sampled="false") == 1


def test_num_traces_evicts_the_oldest_and_counts_it_when_due() -> None:
    p, sink, t = _proc({"decision_wait": "1s", "num_traces": 2,
                        "policies": [{"name": "all", "type": "always_sample"}]})
    for tid in (1, 2, 3):
        p.consume(one(span(f"t{tid}", tid=tid)))
    assert list(p.traces) == [(2).to_bytes(16, "big"), (3).to_bytes(16, "big")]
    assert _value(t, "sampling_traces_on_memory") == 2
    p._tick(rotate=True)
    p._tick(rotate=True)
    assert sorted(s.name for s in sink.spans()) == ["t2", "t3"]
    assert _value(t, "sampling_trace_dropped_too_early_total") == 1


def test_shutdown_decides_pending_traces_unless_told_to_drop_them() -> None:
    p, sink, _ = _proc({"decision_wait": "30s", "policies": [{"name": "all", "type": "always_sample"}]})
    p.start(None)
    p.consume(one(span("pending", tid=5)))
    p.shutdown()
    assert [s.name for s in sink.spans()] == ["pending"]
    p, sink, _ = _proc({"decision_wait": "30s", "drop_pending_traces_on_shutdown": True,
                        "policies": [{"name": "all", "type": "always_sample"}]})
    p.consume(one(span("pending", tid=5)))
    p.shutdown()
    assert sink.spans() == []


def test_a_drop_outweighs_a_sample_and_first_match_stops_evaluating() -> None:
    drop = {"name": "no-health", "type": "drop", "drop": {"drop_sub_policy": [
        {"name": "h", "type": "string_attribute", "string_attribute": {"key": "http.route", "values": ["/health"]}}]}}
    p, sink, t = _proc({"decision_wait": "1s", "policies": [{"name": "all", "type": "always_sample"}, drop]})
    p.consume(one(span("h", tid=1, attrs={"http.route": "/health"})))
    p.consume(one(span("x", tid=2, attrs={"http.route": "/x"})))
    p._tick(rotate=True)
    p._tick(rotate=True)
    assert [s.name for s in sink.spans()] == ["x"]
    assert _value(t, "global_count_traces_sampled_total", sampled="false", decision="dropped") == 1
    p, _, t = _proc({"decision_wait": "1s", "sample_on_first_match": True,
                     "policies": [{"name": "all", "type": "always_sample"}, *ERRORS]}, "tail_sampling/fm")
    p.consume(one(span("x", tid=1, status_code=STATUS_ERROR)))
    p._tick(rotate=True)
    p._tick(rotate=True)
    assert _value(t, "sampling_policy_execution_count_total", policy="fm.all") == 1
    assert _value(t, "sampling_policy_execution_count_total", policy="fm.errors") == 0


@pytest.mark.parametrize("cfg, message", [
    ({"policies": [{"type": "always_sample"}]}, "policy name cannot be empty"),
    ({"policies": [{"name": "a", "type": "always_sample"}, {"name": "a", "type": "always_sample"}]},
     'duplicate policy name "a"'),
    ({"policies": [{"name": "x", "type": "sometimes"}]},
     'failed to create policy evaluator for "x": unknown sampling policy type sometimes: one of always_sample'),
    ({"policies": [{"name": "x", "type": "status_code", "status_code": {"status_codes": ["FAIL"]}}]},
     'unknown status code "FAIL", supported: OK, ERROR, UNSET'),
    ({"policies": [{"name": "x", "type": "string_attribute",
                    "string_attribute": {"key": "k", "values": ["("], "enabled_regex_matching": True}}]},
     "invalid regex `(`"),
    ({"policies": [{"name": "x", "type": "numeric_attribute", "numeric_attribute": {"key": "k"}}]},
     "numeric_attribute needs min_value or max_value"),
    ({"policies": [{"name": "x", "type": "bytes_limiting"}]}, "policy type bytes_limiting is not supported"),
    ({"policies": [{"name": "x", "type": "ottl_condition", "ottl_condition": {"spanevent": ["name == \"e\""]}}]},
     "spanevent conditions are not supported"),
    ({"policies": [{"name": "x", "type": "ottl_condition", "ottl_condition": {"span": ["Len(name) > 3"]}}]},
     "unable to parse OTTL condition"),
    ({"block_on_overflow": True}, "block_on_overflow is not supported"),
    ({"sampling_strategy": "span-ingest"}, 'sampling_strategy "span-ingest" is not supported'),
    ({"num_shards": 4}, "num_shards greater than 1 is not supported"),
])
def test_config_errors_name_the_policy_and_the_fix(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        ts.Config.model_validate(cfg)
    assert message in str(e.value), str(e.value)


def test_the_probabilistic_threshold_is_contribs_big_float_product() -> None:
    """calculateThreshold: MaxUint64 x ratio with a 64-bit mantissa, truncated."""
    assert ratio_threshold(1.0) == (1 << 64) - 1
    assert ratio_threshold(0.0) == 0
    assert ratio_threshold(-1) == 0
    assert ratio_threshold(2.0) == (1 << 64) - 1
    assert ratio_threshold(0.5) == (1 << 63) - 1                # (2^64-1)/2 = 2^63 - 0.5, exact, truncated
    assert ratio_threshold(0.25) == (1 << 62) - 1
