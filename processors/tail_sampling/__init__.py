"""`tail_sampling` processor: keep or drop whole traces once their spans have arrived, with contrib's
config and behaviour (processor/tailsamplingprocessor v0.161.0, processor.go, its alpha feature
gates off; policies in policies.py).

How a trace moves, as in contrib:
- its first span puts it in memory and in the current decision batch; a ticker (1 s) closes that
  batch into a ring of max(1, decision_wait in whole seconds) batches and takes the oldest, so a
  trace is decided decision_wait to decision_wait + 1 s after its first span;
- every policy is evaluated (drop policies first): any `drop` match drops it, else any sampled
  policy keeps it (`sample_on_first_match`: the first one stops the evaluation), else not sampled;
- a kept trace leaves at once, every span it has so far; spans that arrive later follow the decision:
  through the decision caches (`decision_cache`: LRUs keyed by the trace id's right half, as
  contrib's), or, without them, through the decided trace that stays in memory until evicted;
- at most `num_traces` traces are held: a new trace evicts the oldest one (decided or not; an
  undecided one is then counted `sampling_trace_dropped_too_early` when its batch comes due);
- at shutdown every pending trace is decided and sent on, unless `drop_pending_traces_on_shutdown`.
Spans are forwarded on the thread that decided (the ticker, or the receiver's for a late span).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Processor
from collector.configtypes import Duration
from collector.spans import ResourceSpans, ScopeSpans, SpanBatch
from collector.telemetry import ComponentTelemetry

from . import policies as p

TICK_S = 1.0       # contrib's tickerFrequency
POLICY_TYPES = ("always_sample", "latency", "numeric_attribute", "probabilistic", "status_code",
                "string_attribute", "rate_limiting", "span_count", "trace_state", "boolean_attribute",
                "ottl_condition", "and", "not", "drop", "composite")
UNSUPPORTED_TYPES = ("bytes_limiting", "trace_flags")
# contrib options we do not build: refused by name rather than silently ignored
UNSUPPORTED_OPTIONS = {"block_on_overflow": False, "decision_wait_after_root_received": "0s",
                       "tail_storage": None, "maximum_trace_size_bytes": 0}


class _Model(ComponentConfig):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LatencyCfg(_Model):
    threshold_ms: int = 0
    upper_threshold_ms: int = 0


class NumericAttributeCfg(_Model):
    key: str = ""
    min_value: int = 0
    max_value: int = 0
    invert_match: bool = False


class ProbabilisticCfg(_Model):
    hash_salt: str = ""
    sampling_percentage: float = 0.0


class StatusCodeCfg(_Model):
    status_codes: list[str] = Field(default_factory=list)


class StringAttributeCfg(_Model):
    key: str = ""
    values: list[str] = Field(default_factory=list)
    enabled_regex_matching: bool = False
    cache_max_size: int = 0
    invert_match: bool = False


class RateLimitingCfg(_Model):
    spans_per_second: int = 0
    burst_capacity: int = 0


class SpanCountCfg(_Model):
    min_spans: int = 0
    max_spans: int = 0


class TraceStateCfg(_Model):
    key: str = ""
    values: list[str] = Field(default_factory=list)


class BooleanAttributeCfg(_Model):
    key: str = ""
    value: bool = False
    invert_match: bool = False


class OttlConditionCfg(_Model):
    error_mode: Literal["propagate", "ignore", "silent"] = "propagate"
    span: list[str] = Field(default_factory=list)
    spanevent: list[str] = Field(default_factory=list)


class SharedPolicyCfg(_Model):
    """A policy: `name`, `type` and the section of that type."""

    name: str = ""
    type: str = ""
    latency: LatencyCfg = Field(default_factory=LatencyCfg)
    numeric_attribute: NumericAttributeCfg = Field(default_factory=NumericAttributeCfg)
    probabilistic: ProbabilisticCfg = Field(default_factory=ProbabilisticCfg)
    status_code: StatusCodeCfg = Field(default_factory=StatusCodeCfg)
    string_attribute: StringAttributeCfg = Field(default_factory=StringAttributeCfg)
    rate_limiting: RateLimitingCfg = Field(default_factory=RateLimitingCfg)
    span_count: SpanCountCfg = Field(default_factory=SpanCountCfg)
    trace_state: TraceStateCfg = Field(default_factory=TraceStateCfg)
    boolean_attribute: BooleanAttributeCfg = Field(default_factory=BooleanAttributeCfg)
    ottl_condition: OttlConditionCfg = Field(default_factory=OttlConditionCfg)


class NotSubPolicyCfg(SharedPolicyCfg):
    pass


class NotCfg(_Model):
    not_sub_policy: NotSubPolicyCfg = Field(default_factory=NotSubPolicyCfg, description="one policy (the fields of `policies`)", json_schema_extra={"doc_expand": False})


class AndSubPolicyCfg(SharedPolicyCfg):
    not_: NotCfg = Field(default_factory=NotCfg, alias="not", json_schema_extra={"doc_expand": False})


class AndCfg(_Model):
    and_sub_policy: list[AndSubPolicyCfg] = Field(default_factory=list, description="policies (the fields of `policies`, and `not`)", json_schema_extra={"doc_expand": False})


class DropCfg(_Model):
    drop_sub_policy: list[AndSubPolicyCfg] = Field(default_factory=list, description="policies (the fields of `policies`, and `not`)", json_schema_extra={"doc_expand": False})


class CompositeSubPolicyCfg(SharedPolicyCfg):
    and_: AndCfg = Field(default_factory=AndCfg, alias="and", json_schema_extra={"doc_expand": False})


class RateAllocationCfg(_Model):
    policy: str = ""
    percent: int = 0


class CompositeCfg(_Model):
    max_total_spans_per_second: int = 0
    policy_order: list[str] = Field(default_factory=list)
    composite_sub_policy: list[CompositeSubPolicyCfg] = Field(default_factory=list, description="policies (the fields of `policies`, and `and`)", json_schema_extra={"doc_expand": False})
    rate_allocation: list[RateAllocationCfg] = Field(default_factory=list)


class PolicyCfg(SharedPolicyCfg):
    composite: CompositeCfg = Field(default_factory=CompositeCfg)
    and_: AndCfg = Field(default_factory=AndCfg, alias="and")
    not_: NotCfg = Field(default_factory=NotCfg, alias="not")
    drop: DropCfg = Field(default_factory=DropCfg)


class DecisionCacheCfg(_Model):
    sampled_cache_size: int = 0
    non_sampled_cache_size: int = 0


class Config(ComponentConfig):
    decision_wait: Duration = 30.0
    num_traces: int = Field(50000, ge=1)
    expected_new_traces_per_sec: int = 0     # contrib: the batches' initial capacity; here a hint only
    policies: list[PolicyCfg] = Field(default_factory=list)
    decision_cache: DecisionCacheCfg = Field(default_factory=DecisionCacheCfg)
    sample_on_first_match: bool = False
    drop_pending_traces_on_shutdown: bool = False
    sampling_strategy: Literal["trace-complete"] = "trace-complete"
    num_shards: int = Field(1, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, default in UNSUPPORTED_OPTIONS.items():
                if key in data and data[key] not in (default, None):
                    raise ValueError(f"{key} is not supported by otelgo-collector's tail_sampling; remove it")
            if data.get("sampling_strategy") == "span-ingest":
                raise ValueError('sampling_strategy "span-ingest" is not supported by otelgo-collector; '
                                 'use "trace-complete" (the default)')
            if isinstance(data.get("num_shards"), int) and data["num_shards"] > 1:
                raise ValueError("num_shards greater than 1 is not supported by otelgo-collector; remove it")
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        build_policies(self.policies)
        return self


# --- from config to evaluators (contrib's getPolicyEvaluator and its helpers)

def _shared(cfg: SharedPolicyCfg) -> p.Policy:
    t = cfg.type
    if t == "always_sample":
        return p.AlwaysSample()
    if t == "latency":
        return p.Latency(cfg.latency.threshold_ms, cfg.latency.upper_threshold_ms)
    if t == "numeric_attribute":
        n = cfg.numeric_attribute
        return p.NumericAttribute(n.key, n.min_value, n.max_value, n.invert_match)
    if t == "probabilistic":
        return p.Probabilistic(cfg.probabilistic.hash_salt, cfg.probabilistic.sampling_percentage)
    if t == "status_code":
        return p.StatusCode(cfg.status_code.status_codes)
    if t == "string_attribute":
        s = cfg.string_attribute
        return p.StringAttribute(s.key, s.values, s.enabled_regex_matching, s.cache_max_size, s.invert_match)
    if t == "rate_limiting":
        return p.RateLimiting(cfg.rate_limiting.spans_per_second, cfg.rate_limiting.burst_capacity)
    if t == "span_count":
        return p.SpanCount(cfg.span_count.min_spans, cfg.span_count.max_spans)
    if t == "trace_state":
        return p.TraceState(cfg.trace_state.key, cfg.trace_state.values)
    if t == "boolean_attribute":
        b = cfg.boolean_attribute
        return p.BooleanAttribute(b.key, b.value, b.invert_match)
    if t == "ottl_condition":
        o = cfg.ottl_condition
        return p.OttlCondition(o.span, o.spanevent, o.error_mode)
    if t in UNSUPPORTED_TYPES:
        raise ValueError(f"policy type {t} is not supported by otelgo-collector yet")
    raise ValueError(f"unknown sampling policy type {t}" + ("" if t else " (type is empty)") +
                     f": one of {', '.join(POLICY_TYPES)}")


def _and_sub(cfg: AndSubPolicyCfg) -> p.Policy:
    return p.Not(_shared(cfg.not_.not_sub_policy)) if cfg.type == "not" else _shared(cfg)


def _composite(cfg: CompositeCfg) -> p.Policy:
    total = float(cfg.max_total_spans_per_second)
    subs = cfg.composite_sub_policy
    default = total / len(subs) if subs else 0.0
    percent = {r.policy: r.percent for r in cfg.rate_allocation}
    built = []
    for sub in subs:
        share = percent.get(sub.name, 0)
        allocated = int(share / 100 * total) if share > 0 else int(default)   # Go: int64(float64)
        evaluator = p.And([_and_sub(s) for s in sub.and_.and_sub_policy]) if sub.type == "and" else _shared(sub)
        built.append((sub.name, evaluator, float(allocated)))
    return p.Composite(cfg.max_total_spans_per_second, built)


def build_policy(cfg: PolicyCfg) -> p.Policy:
    if cfg.type == "composite":
        return _composite(cfg.composite)
    if cfg.type == "and":
        return p.And([_and_sub(s) for s in cfg.and_.and_sub_policy])
    if cfg.type == "not":
        return p.Not(_shared(cfg.not_.not_sub_policy))
    if cfg.type == "drop":
        return p.Drop([_and_sub(s) for s in cfg.drop.drop_sub_policy])
    return _shared(cfg)


def build_policies(cfgs: list[PolicyCfg]) -> list[tuple[str, p.Policy, bool]]:
    """(name, evaluator, is_drop), drop policies first (contrib evaluates them first)."""
    seen: set[str] = set()
    drops: list[tuple[str, p.Policy, bool]] = []
    others: list[tuple[str, p.Policy, bool]] = []
    for cfg in cfgs:
        if cfg.name == "":
            raise ValueError("policy name cannot be empty")
        if cfg.name in seen:
            raise ValueError(f'duplicate policy name "{cfg.name}"')
        seen.add(cfg.name)
        try:
            evaluator = build_policy(cfg)
        except ValueError as e:
            raise ValueError(f'failed to create policy evaluator for "{cfg.name}": {e}') from None
        (drops if cfg.type == "drop" else others).append((cfg.name, evaluator, cfg.type == "drop"))
    return drops + others


# --- the processor

class _Trace:
    __slots__ = ("data", "decision")

    def __init__(self) -> None:
        self.data = p.TraceData()
        self.decision: str | None = None


class _DecisionCache:
    """contrib's LRU decision cache: keyed by the trace id's right half (little-endian u64)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[bytes, str] = OrderedDict()

    def get(self, trace_id: bytes) -> str | None:
        if self.size <= 0:
            return None
        key = trace_id[8:16]
        v = self.items.get(key)
        if v is not None:
            self.items.move_to_end(key)
        return v

    def put(self, trace_id: bytes, policy: str) -> None:
        if self.size <= 0:
            return
        key = trace_id[8:16]
        self.items[key] = policy
        self.items.move_to_end(key)
        if len(self.items) > self.size:
            self.items.popitem(last=False)


def _group_by_trace(rs: ResourceSpans) -> dict[bytes, tuple[ResourceSpans, int]]:
    """One ResourceSpans per trace of this resource (its scopes kept), with the span count."""
    by: dict[bytes, dict[int, ScopeSpans]] = {}
    for ss in rs.scope_spans:
        for s in ss.spans:
            scopes = by.setdefault(s.trace_id, {})
            out = scopes.get(id(ss))
            if out is None:
                out = scopes[id(ss)] = ScopeSpans(ss.scope, [], ss.schema_url)
            out.spans.append(s)
    return {tid: (ResourceSpans(rs.resource, list(scopes.values()), rs.schema_url),
                  sum(len(x.spans) for x in scopes.values())) for tid, scopes in by.items()}


class TailSamplingProcessor(Processor):
    mutates_data = False   # spans are regrouped per trace, never changed

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer,
                 config: Config) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.cfg = config
        self.policies = build_policies(config.policies)
        self.traces: dict[bytes, _Trace] = {}          # insertion order = contrib's deleteTraceQueue
        self.ring: list[set[bytes]] = [set() for _ in range(max(1, int(config.decision_wait)))]
        self.current: set[bytes] = set()
        self.take_id = 0
        self.sampled_cache = _DecisionCache(config.decision_cache.sampled_cache_size)
        self.not_sampled_cache = _DecisionCache(config.decision_cache.non_sampled_cache_size)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        m = telemetry.metrics
        prefix = "otelcol_processor_tail_sampling_"
        label = (lambda n: f"{id.name}.{n}") if id.name else (lambda n: n)
        self._policy_label = {name: label(name) for name, _, _ in self.policies}
        self._m_policy = m.counter(prefix + "count_traces_sampled",
                                   "Count of traces that were sampled or not per sampling policy",
                                   ["policy", "sampled", "decision"])
        self._m_global = m.counter(prefix + "global_count_traces_sampled",
                                   "Global count of traces that were sampled or not by at least one policy",
                                   ["sampled", "decision"])
        self._m_new = m.counter(prefix + "new_trace_id_received", "Counts the arrival of new traces")
        self._m_too_early = m.counter(prefix + "sampling_trace_dropped_too_early",
                                      "Count of traces that needed to be dropped before the configured wait time")
        self._m_on_memory = m.gauge(prefix + "sampling_traces_on_memory",
                                    "Tracks the number of traces current on memory")
        self._m_cache = m.counter(prefix + "early_releases_from_cache_decision",
                                  "Number of spans that were able to be immediately released due to a decision "
                                  "cache hit.", ["sampled"])
        self._m_errors = m.counter(prefix + "sampling_policy_evaluation_error",
                                   "Count of sampling policy evaluation errors")
        self._m_exec = m.counter(prefix + "sampling_policy_execution_count",
                                 "Total number of times tail sampling policies are executed", ["policy"])

    # -- the pipeline side

    def start(self, host: Host) -> None:
        self._thread = threading.Thread(target=self._ticker, name=f"tail_sampling-{self.id}", daemon=True)
        self._thread.start()

    def consume(self, batch: SpanBatch) -> None:
        out: list[ResourceSpans] = []
        with self._lock:
            for rs in batch.resource_spans:
                for tid, (trs, n) in _group_by_trace(rs).items():
                    self._add(tid, trs, n, out)
            self._m_on_memory.set(len(self.traces))
        self._forward(out)

    def _add(self, tid: bytes, rs: ResourceSpans, n: int, out: list[ResourceSpans]) -> None:
        if self.sampled_cache.get(tid) is not None:
            out.append(rs)
            self._m_cache.labels("true").inc(n)
            return
        if self.not_sampled_cache.get(tid) is not None:
            self._m_cache.labels("false").inc(n)
            return
        t = self.traces.get(tid)
        if t is None:
            if len(self.traces) >= self.cfg.num_traces:
                del self.traces[next(iter(self.traces))]     # the oldest, decided or not
            t = self.traces[tid] = _Trace()
            self.current.add(tid)
            self._m_new.inc()
        t.data.span_count += n
        if t.decision is None:
            t.data.batches.append(rs)
        elif t.decision == p.SAMPLED:
            out.append(rs)                     # a late span of a kept trace: at once

    # -- the decision side

    def _ticker(self) -> None:
        while not self._stop.wait(TICK_S):
            self._tick(rotate=True)

    def _tick(self, rotate: bool) -> None:
        """Decide the oldest batch; `rotate`: the current batch joins the ring (not at shutdown)."""
        with self._lock:
            if rotate:
                idx = self.take_id % len(self.ring)
                taken, self.ring[idx] = self.ring[idx], self.current
                due = list(taken)
                self.current = set()
                self.take_id += 1
            else:                              # the ring oldest first, then the current batch
                n = len(self.ring)
                due = [tid for i in range(n) for tid in self.ring[(self.take_id + i) % n]] + list(self.current)
                self.ring = [set() for _ in self.ring]
                self.current = set()
            out = self._decide(due)
            self._m_on_memory.set(len(self.traces))
        self._forward(out)

    def _decide(self, due: list[bytes]) -> list[ResourceSpans]:
        out: list[ResourceSpans] = []
        for tid in due:
            t = self.traces.get(tid)
            if t is None:
                self._m_too_early.inc()
                continue
            if t.decision is not None or not t.data.batches:
                continue
            decision, policy = self._evaluate(tid, t.data)
            t.decision = decision
            self._m_global.labels("true" if decision == p.SAMPLED else "false", decision).inc()
            if decision == p.SAMPLED:
                out.extend(t.data.batches)
                self.sampled_cache.put(tid, policy)
                if self.sampled_cache.size > 0:
                    del self.traces[tid]
            else:
                self.not_sampled_cache.put(tid, policy)
                if self.not_sampled_cache.size > 0:
                    del self.traces[tid]
            t.data = p.TraceData(span_count=t.data.span_count)   # the spans are gone, sent or dropped
        return out

    def _evaluate(self, tid: bytes, data: p.TraceData) -> tuple[str, str]:
        first: dict[str, str] = {}
        for name, evaluator, is_drop in self.policies:
            self._m_exec.labels(self._policy_label[name]).inc()
            try:
                d = evaluator.evaluate(tid, data)
            except p.PolicyError:
                self._m_errors.inc()
                continue
            self._m_policy.labels(self._policy_label[name], "true" if d == p.SAMPLED else "false", d).inc()
            first.setdefault(d, name)
            if d == p.DROPPED:
                break
            if is_drop:
                continue
            if self.cfg.sample_on_first_match and d == p.SAMPLED:
                break
        if p.DROPPED in first:
            return p.DROPPED, first[p.DROPPED]
        if p.SAMPLED in first:
            return p.SAMPLED, first[p.SAMPLED]
        return p.NOT_SAMPLED, ""

    def _forward(self, out: list[ResourceSpans]) -> None:
        if out:
            self.next_consumer.consume(SpanBatch(out))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if not self.cfg.drop_pending_traces_on_shutdown:
            self._tick(rotate=False)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> TailSamplingProcessor:
    return TailSamplingProcessor(id, telemetry, next_consumer, config)


factory = Factory(
    type="tail_sampling", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
    description="Keeps or drops whole traces by policies once their spans have arrived (contrib's tail_sampling).",
)
