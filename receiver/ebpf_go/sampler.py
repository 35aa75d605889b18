"""Head sampling in the kernel: the `sampler` option of the ebpf_go receiver.

    sampler: {type: parentbased_traceidratio, ratio: 0.05}

The names and meanings of the SDKs' OTEL_TRACES_SAMPLER. Every probe decides where it makes a
span's ids (`new_span_ids` and `sample`, bpf/go_types.h): a root by the sampler's root
rule, a span with a remote parent (an incoming `traceparent`) by that parent's sampled flag in the
parentbased_* types or by the root rule otherwise, a span with a local parent (a server's request,
a function span) takes its parent's flag. An unsampled span writes no ring-buffer record (it is
counted, `unsampled[0]` in bpf/record.h), nor do its children, but it keeps its ids and its
`traceparent` goes out with flags 00, so the services downstream drop the trace too.

The ratio rule is the W3C / OpenTelemetry consistent-probability one: the trace id's low 56 bits
(bytes 9-15, big-endian) as a number R, sampled when R >= T with the rejection threshold
T = 2^56 - round(ratio * 2^56); an SDK downstream with the same ratio decides the same way.

Without `sampler` every request is recorded and incoming flags are passed on as they came.
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from collector.component import ComponentConfig

SamplerType = Literal["always_on", "always_off", "traceidratio", "parentbased_always_on",
                      "parentbased_always_off", "parentbased_traceidratio"]
ROOT_ON, ROOT_OFF, ROOT_RATIO = 0, 1, 2     # SAMPLER_ROOT in bpf/go_types.h
ONE = 1 << 56


class SamplerConfig(ComponentConfig):
    """`sampler`: which requests are traced, decided in BPF before any record is written."""

    type: SamplerType
    ratio: float | None = None   # for traceidratio and parentbased_traceidratio: 0.0 to 1.0

    @model_validator(mode="after")
    def _check(self) -> SamplerConfig:
        wants = self.type.endswith("traceidratio")
        if wants and self.ratio is None:
            raise ValueError(f"ratio: {self.type} needs a ratio between 0 and 1, e.g. ratio: 0.05")
        if not wants and self.ratio is not None:
            raise ValueError(f"ratio: {self.type} takes no ratio; remove it or use "
                             f"{'parentbased_' if self.type.startswith('parentbased') else ''}traceidratio")
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio: {self.ratio} must be between 0 and 1")
        return self

    @property
    def parent_based(self) -> bool:
        return self.type.startswith("parentbased_")

    @property
    def root(self) -> int:
        if self.type.endswith("traceidratio"):
            return ROOT_RATIO
        return ROOT_OFF if self.type.endswith("always_off") else ROOT_ON

    @property
    def threshold(self) -> int:
        """The rejection threshold T on the trace id's low 56 bits (sampled when R >= T)."""
        if self.root == ROOT_RATIO and self.ratio is not None:
            return threshold(self.ratio)
        return threshold(0.0 if self.root == ROOT_OFF else 1.0)


def threshold(ratio: float) -> int:
    return ONE - round(ratio * ONE)


def randomness(trace_id: bytes) -> int:
    """R: the trace id's low 56 bits."""
    return int.from_bytes(trace_id[9:16], "big")


def decide(cfg: SamplerConfig, trace_id: bytes, parent_flags: int | None) -> bool:
    """What the BPF decides for a span with this trace id and a remote parent's flags (None: a root).
    The reference the tests check the kernel's decisions against."""
    if parent_flags is not None and cfg.parent_based:
        return bool(parent_flags & 1)
    if cfg.root == ROOT_RATIO:
        return randomness(trace_id) >= cfg.threshold
    return cfg.root == ROOT_ON


def sampler_flags(cfg: SamplerConfig | None) -> list[str]:
    """The -D flags every probe's C is compiled with (none: no sampler, every span recorded)."""
    if cfg is None:
        return []
    return ["-DSAMPLER=1", f"-DSAMPLER_ROOT={cfg.root}", f"-DSAMPLER_PARENT={int(cfg.parent_based)}",
            f"-DSAMPLER_THRESHOLD={cfg.threshold}ULL"]
