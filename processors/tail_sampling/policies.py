"""The tail_sampling processor's policies, decision for decision contrib's (processor/
tailsamplingprocessor v0.161.0, internal/sampling/*.go, with its alpha feature gates off).

Each policy looks at every span the trace has so far, in arrival order (`TraceData.batches`: one
ResourceSpans per request and resource that brought spans of it) and answers SAMPLED, NOT_SAMPLED
or, for `drop`, DROPPED. What the collector's accessors do with a value of another type is kept:
a string policy reads a non-string attribute as "", a numeric one a non-int as 0, a boolean one a
non-bool as false.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

from collector.spans import Resource, ResourceSpans, ScopeSpans, Span
from processors.filter import compile_condition

SAMPLED, NOT_SAMPLED, DROPPED = "sampled", "not_sampled", "dropped"
STATUS_CODES = {"UNSET": 0, "OK": 1, "ERROR": 2}
MAX_INT64, MIN_INT64 = (1 << 63) - 1, -(1 << 63)


class PolicyError(Exception):
    """A policy that could not decide (counted; the other policies still decide)."""


@dataclass
class TraceData:
    batches: list[ResourceSpans] = field(default_factory=list)
    span_count: int = 0

    def spans(self) -> Iterator[tuple[ResourceSpans, ScopeSpans, Span]]:
        for rs in self.batches:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    yield rs, ss, s


class Policy(Protocol):
    def evaluate(self, trace_id: bytes, trace: TraceData) -> str: ...


# --- the helpers of util.go: any resource or span matches (or, inverted, every one is fine)

def any_resource_or_span(trace: TraceData, resource_ok: Callable[[Resource], bool],
                         span_ok: Callable[[Span], bool]) -> str:
    for rs in trace.batches:
        if resource_ok(rs.resource):
            return SAMPLED
        for ss in rs.scope_spans:
            for s in ss.spans:
                if span_ok(s):
                    return SAMPLED
    return NOT_SAMPLED


def every_resource_and_span(trace: TraceData, resource_ok: Callable[[Resource], bool],
                            span_ok: Callable[[Span], bool]) -> str:
    for rs in trace.batches:
        if not resource_ok(rs.resource):
            return NOT_SAMPLED
        for ss in rs.scope_spans:
            for s in ss.spans:
                if not span_ok(s):
                    return NOT_SAMPLED
    return SAMPLED


def any_span(trace: TraceData, ok: Callable[[Span], bool]) -> str:
    return SAMPLED if any(ok(s) for _, _, s in trace.spans()) else NOT_SAMPLED


def as_str(v: Any) -> str:
    return v if isinstance(v, str) else ""


def as_int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else False


# --- the policies

class AlwaysSample:
    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        return SAMPLED


class Latency:
    """The span from the earliest start to the latest end, checked as spans are walked (as contrib
    does: with an upper bound, a prefix of the trace inside (threshold, upper] is enough)."""

    def __init__(self, threshold_ms: int, upper_threshold_ms: int) -> None:
        self.lo, self.hi = threshold_ms, upper_threshold_ms

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        lo_t = hi_t = 0
        for _, _, s in trace.spans():
            if lo_t == 0 or s.start_time_unix_nano < lo_t:
                lo_t = s.start_time_unix_nano
            if hi_t == 0 or s.end_time_unix_nano > hi_t:
                hi_t = s.end_time_unix_nano
            d = hi_t - lo_t
            ms = d // 1_000_000 if d >= 0 else -(-d // 1_000_000)     # Go's Duration.Milliseconds: truncated
            if (ms > self.lo) if self.hi == 0 else (self.lo < ms <= self.hi):
                return SAMPLED
        return NOT_SAMPLED


class StatusCode:
    def __init__(self, codes: list[str]) -> None:
        if not codes:
            raise ValueError("expected at least one status code to filter on")
        for c in codes:
            if c not in STATUS_CODES:
                raise ValueError(f'unknown status code "{c}", supported: OK, ERROR, UNSET')
        self.codes = {STATUS_CODES[c] for c in codes}

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        return any_span(trace, lambda s: s.status_code in self.codes)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def ratio_threshold(ratio: float) -> int:
    """contrib calculateThreshold: MaxUint64 x ratio in big.Float (64-bit mantissa, to nearest
    even), truncated to uint64 (0 below zero, MaxUint64 above)."""
    product = Fraction((1 << 64) - 1) * Fraction(ratio)
    if product <= 0:
        return 0
    shift = product.numerator.bit_length() - product.denominator.bit_length()
    while Fraction(2) ** shift > product:
        shift -= 1
    while Fraction(2) ** (shift + 1) <= product:
        shift += 1
    scale = Fraction(2) ** (shift - 63)          # the mantissa's unit: 64 significant bits
    rounded = round(product / scale) * scale    # Fraction round: half to even
    return min(math.floor(rounded), (1 << 64) - 1)


class Probabilistic:
    """FNV-1a-64 of hash_salt then the 16 trace-id bytes, sampled when <= MaxUint64 x ratio."""

    def __init__(self, hash_salt: str, sampling_percentage: float) -> None:
        self.salt = (hash_salt or "default-hash-seed").encode()
        self.threshold = ratio_threshold(sampling_percentage / 100)

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        return SAMPLED if fnv1a64(self.salt + trace_id) <= self.threshold else NOT_SAMPLED


class StringAttribute:
    """Exact values (empty ones ignored) or regular expressions (searched, as Go's MatchString);
    with regex, the last `cache_max_size` answers are remembered, as contrib's LRU does."""

    def __init__(self, key: str, values: list[str], regex: bool, cache_max_size: int, invert: bool) -> None:
        self.key, self.invert = key, invert
        if regex:
            try:
                patterns = [re.compile(v) for v in values]
            except re.error as e:
                raise ValueError(f"invalid regex `{e.pattern!s}`: {e}") from None
            cache: OrderedDict[str, bool] = OrderedDict()
            size = cache_max_size if cache_max_size > 0 else 128

            def match(text: str) -> bool:
                hit = cache.get(text)
                if hit is not None:
                    cache.move_to_end(text)
                    return hit
                hit = any(p.search(text) for p in patterns)
                cache[text] = hit
                if len(cache) > size:
                    cache.popitem(last=False)
                return hit
            self.match: Callable[[str], bool] = match
        else:
            exact = {v for v in values if v}
            self.match = lambda text: text in exact

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        key, match = self.key, self.match

        def resource_hit(r: Resource) -> bool:
            return key in r.attributes and match(as_str(r.attributes[key]))

        def span_hit(s: Span) -> bool:
            if key not in s.attributes:
                return False
            text = as_str(s.attributes[key])
            return text != "" and match(text)

        if self.invert:
            return every_resource_and_span(trace, lambda r: not resource_hit(r), lambda s: not span_hit(s))
        return any_resource_or_span(trace, resource_hit, span_hit)


class NumericAttribute:
    def __init__(self, key: str, min_value: int, max_value: int, invert: bool) -> None:
        if min_value == 0 and max_value == 0:
            raise ValueError("numeric_attribute needs min_value or max_value (0 means unset)")
        self.key, self.invert = key, invert
        self.lo = min_value if min_value != 0 else MIN_INT64
        self.hi = max_value if max_value != 0 else MAX_INT64

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        key, lo, hi = self.key, self.lo, self.hi

        def hit(attrs: dict[str, Any]) -> bool:
            return key in attrs and lo <= as_int(attrs[key]) <= hi

        if self.invert:
            return every_resource_and_span(trace, lambda r: not hit(r.attributes), lambda s: not hit(s.attributes))
        return any_resource_or_span(trace, lambda r: hit(r.attributes), lambda s: hit(s.attributes))


class BooleanAttribute:
    def __init__(self, key: str, value: bool, invert: bool) -> None:
        self.key, self.value, self.invert = key, value, invert

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        key, value = self.key, self.value
        if self.invert:
            def fine(attrs: dict[str, Any]) -> bool:
                return key not in attrs or as_bool(attrs[key]) != value
            return every_resource_and_span(trace, lambda r: fine(r.attributes), lambda s: fine(s.attributes))
        return any_resource_or_span(trace, lambda r: key in r.attributes and as_bool(r.attributes[key]) == value,
                                    lambda s: key in s.attributes and as_bool(s.attributes[key]) == value)


class SpanCount:
    def __init__(self, min_spans: int, max_spans: int) -> None:
        self.lo, self.hi = min_spans, max_spans

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        n = trace.span_count
        ok = n >= self.lo if self.hi == 0 else self.lo <= n <= self.hi
        return SAMPLED if ok else NOT_SAMPLED


# W3C trace-context tracestate, as go.opentelemetry.io/otel/trace.ParseTraceState checks it
_TS_KEY = re.compile(r"^(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})$")
_TS_VALUE = re.compile(r"^[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]$")


def parse_tracestate(text: str) -> dict[str, str] | None:
    """key -> value, or None when the tracestate is invalid (then no key matches)."""
    out: dict[str, str] = {}
    if text == "":
        return out
    for member in text.split(","):
        member = member.strip(" \t")
        if member == "":
            continue
        key, eq, value = member.partition("=")
        if not eq or not _TS_KEY.match(key) or not _TS_VALUE.match(value) or key in out:
            return None
        out[key] = value
    return out if len(out) <= 32 else None


class TraceState:
    def __init__(self, key: str, values: list[str]) -> None:
        self.key = key
        self.values = {v for v in values if v and len(key) + len(v) < 256}

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        def hit(s: Span) -> bool:
            ts = parse_tracestate(s.trace_state)
            return ts is not None and ts.get(self.key, "") in self.values
        return any_span(trace, hit)


class TokenBucket:
    """golang.org/x/time/rate's Limiter.AllowN: `rate` tokens a second, at most `burst`, full at start."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()

    def allow(self, n: int) -> bool:
        if self.rate == 0:                      # x/time/rate: a zero limit spends the burst once
            if self.burst >= n:
                self.burst -= n
                return True
            return False
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if n <= self.tokens:
            self.tokens -= n
            return True
        return False


class RateLimiting:
    def __init__(self, spans_per_second: int, burst_capacity: int) -> None:
        self.bucket = TokenBucket(spans_per_second, burst_capacity if burst_capacity > 0 else spans_per_second * 2)

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        return SAMPLED if self.bucket.allow(trace.span_count) else NOT_SAMPLED


class OttlCondition:
    """`span` conditions in the OTTL subset of the filter processor: sampled when any span meets one."""

    def __init__(self, span: list[str], spanevent: list[str], error_mode: str) -> None:
        if not span and not spanevent:
            raise ValueError("expected at least one OTTL condition to filter on")
        if spanevent:
            raise ValueError("ottl_condition.spanevent conditions are not supported by otelgo-collector; "
                             "use ottl_condition.span")
        self.conditions = [compile_condition(c) for c in span]
        self.error_mode = error_mode

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        for c in trace.spans():
            for cond in self.conditions:
                try:
                    hit = cond(c)
                except Exception as e:   # a condition over a value of an unexpected type
                    if self.error_mode == "propagate":
                        raise PolicyError(str(e)) from e
                    hit = False
                if hit:
                    return SAMPLED
        return NOT_SAMPLED


class Not:
    def __init__(self, sub: Policy) -> None:
        self.sub = sub

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        d = self.sub.evaluate(trace_id, trace)
        return {SAMPLED: NOT_SAMPLED, NOT_SAMPLED: SAMPLED}.get(d, d)


class And:
    def __init__(self, subs: list[Policy]) -> None:
        self.subs = subs

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        for sub in self.subs:
            if sub.evaluate(trace_id, trace) == NOT_SAMPLED:
                return NOT_SAMPLED
        return SAMPLED


class Drop(And):
    """An `and` that answers DROPPED when every sub-policy samples: a drop outweighs every other
    policy's decision."""

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        return DROPPED if super().evaluate(trace_id, trace) == SAMPLED else NOT_SAMPLED


class Composite:
    """The first sub-policy that samples decides, within its share of max_total_spans_per_second
    in the current wall-clock second (counters reset each second); over its share: not sampled."""

    def __init__(self, max_total: int, subs: list[tuple[str, Policy, float]],
                 clock: Callable[[], float] = time.time) -> None:
        self.max_total, self.subs, self.clock = max_total, subs, clock
        self.used = [0] * len(subs)
        self.second = 0

    def evaluate(self, trace_id: bytes, trace: TraceData) -> str:
        now = int(self.clock())
        if now != self.second:
            self.second, self.used = now, [0] * len(self.subs)
        for i, (_name, sub, allocated) in enumerate(self.subs):
            if sub.evaluate(trace_id, trace) == SAMPLED:
                after = self.used[i] + trace.span_count
                if after <= allocated and after <= self.max_total:
                    self.used[i] = after
                    return SAMPLED
                return NOT_SAMPLED
        return NOT_SAMPLED
