"""`probabilistic_sampler` processor, `hash_seed` mode, decision-for-decision the collector's.

contrib processor/probabilisticsamplerprocessor (v0.161.0, sampler_mode.go, fnvhasher.go):
    h       = FNV-1a-32(hash_seed as 4 little-endian bytes ‖ the 16 trace-id bytes)
    bucket  = h & 0x3FFF
    scaled  = uint32(float32(sampling_percentage) * float32(16384 / 100.0))   # float32 product, truncated
    sampled = bucket < scaled
A span attribute `sampling.priority` (int, double or numeric string) overrides: 0 drops, > 0 keeps.
Like the collector, a kept span's W3C tracestate gets `ot=rv:<14 hex>;th:<threshold>` (the randomness
derived from the hash and the rejection threshold); a span whose tracestate already carries `rv` or
`th`, or has no trace id, is dropped when `fail_closed` (the default) and kept otherwise.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Literal

from pydantic import model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Kind, Processor
from collector.spans import Span, SpanBatch
from collector.telemetry import ComponentTelemetry

NUM_BUCKETS = 0x4000
BUCKET_MASK = NUM_BUCKETS - 1
_MAX_56 = 1 << 56
NEVER = _MAX_56  # rejection threshold that nothing passes
ALWAYS = 0
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def f32(x: float) -> float:
    """Round a Python float to the nearest IEEE float32 (Go's float32 conversion)."""
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


# Go: percentageScaleFactor = numHashBuckets / 100.0, an untyped constant turned float32 in `pct * k`.
_SCALE32 = f32(NUM_BUCKETS / 100.0)


def fnv1a32(data: bytes, h: int = _FNV_OFFSET) -> int:
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def compute_hash(trace_id: bytes, seed: int) -> int:
    return fnv1a32(trace_id, fnv1a32(struct.pack("<I", seed & 0xFFFFFFFF)))


def scaled_rate(pct: float) -> int:
    """uint32(pct * percentageScaleFactor) in float32, after capping at 100."""
    p = f32(pct)
    if p > 100:
        p = 100.0
    if p <= 0:
        return 0
    return int(f32(p * _SCALE32))


def randomness56(h: int) -> int:
    """contrib randomnessFromBytes: the 56-bit r-value built from the 32-bit hash."""
    hashed = h & BUCKET_MASK
    rprime14 = NUM_BUCKETS - 1 - hashed
    unused18 = h >> (32 - 14)
    mixed28 = unused18 ^ (unused18 << 10)
    return (rprime14 << 42) | (mixed28 << 14) | hashed


def _tvalue(threshold: int) -> str:
    if threshold == ALWAYS:
        return "0"
    return f"{threshold:014x}".rstrip("0")


def sampling_priority(span: Span) -> int:
    """0 defer, 1 must sample, 2 must not (contrib parseSpanSamplingPriority)."""
    v = span.attributes.get("sampling.priority")
    if v is None or isinstance(v, bool):
        return 0
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return 0
    if isinstance(v, int | float):
        if v == 0:
            return 2
        if v > 0:
            return 1
    return 0


def _parse_tracestate(ts: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
    """(ot sub-values, other members) or None when the tracestate is not valid W3C syntax."""
    ot: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    if not ts.strip():
        return ot, others
    for member in ts.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        key, eq, value = member.partition("=")
        if not eq or not key or not value:
            return None
        if key == "ot":
            for part in value.split(";"):
                k, colon, v = part.partition(":")
                if not colon or not k:
                    return None
                ot.append((k, v))
        else:
            others.append((key, value))
    return ot, others


class Config(ComponentConfig):
    sampling_percentage: float = 0.0
    hash_seed: int = 0
    mode: Literal["", "hash_seed"] = ""
    fail_closed: bool = True
    sampling_precision: int = 4

    @model_validator(mode="before")
    @classmethod
    def _mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") in ("proportional", "equalizing"):
            raise ValueError(f'mode "{data["mode"]}" is not supported by otelgo-collector yet: use mode hash_seed')
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        pct = f32(self.sampling_percentage)
        if math.isnan(pct) or math.isinf(pct):
            raise ValueError(f"sampling rate is invalid: {pct:f}%")
        if pct < 0:
            raise ValueError(f"sampling rate is negative: {pct:f}%")
        if pct != 0 and pct / 100 < 2 ** -56:
            raise ValueError(f"sampling rate is too small: {pct:g}%")
        if not 0 <= self.hash_seed <= 0xFFFFFFFF:
            raise ValueError("hash_seed must be an unsigned 32-bit integer (0 to 4294967295)")
        if self.sampling_precision == 0:
            raise ValueError("invalid sampling precision: 0")
        if self.sampling_precision > 14:
            raise ValueError(f"sampling precision is too great, should be <= 14: {self.sampling_precision}")
        return self


class HashSeedSampler:
    """The decision and the tracestate update, per span."""

    def __init__(self, pct: float, seed: int, fail_closed: bool = True) -> None:
        self.seed_state = fnv1a32(struct.pack("<I", seed & 0xFFFFFFFF))
        self.scaled = scaled_rate(pct)
        self.never = self.scaled == 0
        self.threshold = NEVER if self.never else (NUM_BUCKETS - self.scaled) << 42
        self.fail_closed = fail_closed

    def bucket(self, trace_id: bytes) -> int:
        return fnv1a32(trace_id, self.seed_state) & BUCKET_MASK

    def sampled_by_hash(self, trace_id: bytes) -> bool:
        """The pure rule, without priority or tracestate: bucket < scaled."""
        return self.bucket(trace_id) < self.scaled

    def decide(self, span: Span) -> tuple[bool, str]:
        """(sampled, policy name); sets the span's tracestate when sampled, as the collector does."""
        tid = span.trace_id
        has_tid = bool(tid) and any(tid)
        parsed = _parse_tracestate(span.trace_state)
        carrier = parsed is not None
        error = not carrier
        if self.never:
            rnd, policy = _MAX_56 - 1, "sampling_priority"  # AllProbabilitiesRandomness
            threshold = NEVER
        else:
            rnd = randomness56(fnv1a32(tid, self.seed_state)) if has_tid else 0
            policy = "trace_id_hash" if has_tid else "missing_randomness"
            if parsed is not None and any(k in ("rv", "th") for k, _ in parsed[0]):
                error, carrier = True, False
            if not has_tid:
                error = True
            threshold = (NEVER if self.fail_closed else ALWAYS) if error else self.threshold
        prio = sampling_priority(span)
        if prio == 2:
            threshold, policy = NEVER, "sampling_priority"
        elif prio == 1:
            threshold, policy = ALWAYS, "sampling_priority"
        sampled = threshold < _MAX_56 and rnd >= threshold
        if sampled and carrier and parsed is not None:
            ot, others = parsed
            extra = [(k, v) for k, v in ot if k not in ("rv", "th")]
            fields = []
            if not self.never:
                fields.append(f"rv:{rnd:014x}")
            fields.append(f"th:{_tvalue(threshold)}")
            fields += [f"{k}:{v}" for k, v in extra]
            members = ["ot=" + ";".join(fields)] + [f"{k}={v}" for k, v in others]
            span.trace_state = ",".join(members)
        return sampled, policy


class ProbabilisticSamplerProcessor(Processor):
    mutates_data = True  # writes the tracestate of kept spans

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer,
                 config: Config) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.sampler = HashSeedSampler(config.sampling_percentage, config.hash_seed, config.fail_closed)
        m = telemetry.metrics
        self._count = m.counter("otelcol_processor_probabilistic_sampler_count_traces_sampled",
                                "Count of traces that were sampled or not", ["processor", "policy", "sampled"])
        self._counters: dict[tuple[str, bool], Any] = {}

    def consume(self, batch: SpanBatch) -> None:
        tally: dict[tuple[str, bool], int] = {}
        decide = self.sampler.decide

        def keep(_rs: Any, _ss: Any, span: Span) -> bool:
            sampled, policy = decide(span)
            key = (policy, sampled)
            tally[key] = tally.get(key, 0) + 1
            return sampled

        out = batch.filter_spans(keep)
        for (policy, sampled), count in tally.items():
            c = self._counters.get((policy, sampled))
            if c is None:
                c = self._count.labels(str(self.id), policy, "true" if sampled else "false")
                self._counters[(policy, sampled)] = c
            c.inc(count)
        kept = out.span_count()
        if kept:
            self.next_consumer.consume(out)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> ProbabilisticSamplerProcessor:
    return ProbabilisticSamplerProcessor(id, telemetry, next_consumer, config)


factory = Factory(
    type="probabilistic_sampler", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
    description="Keeps a fixed percentage of traces, by the collector's hash_seed algorithm.",
)
