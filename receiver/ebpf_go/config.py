"""The `ebpf_go` receiver's configuration, as a user writes it: `EbpfGoConfig` with its defaults and
the messages that name a bad field, `TargetConfig` (which processes to trace) and
`instrumentations` (one switch per probe of the registry, built from probes/__init__.py).

The options table of receiver/ebpf_go/README.md is generated from these models
(tools/gen_config_docs.py); the receiver reads the config, never another component's.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from collector.component import ComponentConfig
from collector.configtypes import Duration

from . import discovery
from .probes import PROBES
from .sampler import SamplerConfig


class TargetConfig(ComponentConfig):
    """Which processes to trace: every condition set must hold."""

    exe_path: str | None = None           # glob on the executable's path, e.g. /srv/*/bin/api
    pid: list[int] | None = None          # one pid or a list
    name: str | None = None               # regex on the process name, executable name or command line
    open_ports: list[int] | None = None   # TCP ports the process listens on
    service_name: str | None = None       # service.name for these processes
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)  # extra resource attributes

    @field_validator("pid", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, int) else v

    @field_validator("name")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"name: invalid regular expression {v!r}: {e}") from None
        return v


class FunctionConfig(ComponentConfig):
    """One entry of `functions`: spans for the calls of the Go functions it names (probes/functions)."""

    symbol: str                         # Go symbol as the binary names it, or a glob: main.lookupItem, pkg.(*T).*
    min_duration: Duration = 0.0        # shorter calls get no span (dropped in BPF)
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)  # on each span
    max_spans_per_second: int = 10_000  # per function: beyond, calls are counted and dropped in BPF

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, v: str) -> str:
        v = v.strip()
        if not v or v.replace("*", "").replace("?", "").replace("(", "").strip() == "":
            raise ValueError("symbol: name a Go function, e.g. main.lookupItem or \"example.com/shop/store.(*Store).*\"")
        if any(c.isspace() for c in v):
            raise ValueError(f"symbol: {v!r} has a space; Go symbols have none (e.g. main.(*Server).Handle)")
        return v

    @field_validator("max_spans_per_second")
    @classmethod
    def _rate(cls, v: int) -> int:
        if not 1 <= v <= 10_000_000:
            raise ValueError(f"max_spans_per_second: {v} must be between 1 and 10000000")
        return v


class _Instrumentations(ComponentConfig):
    """`instrumentations`: one switch per probe of the registry (probes/__init__.py), on by default."""


InstrumentationsConfig = create_model(  # type: ignore[call-overload]
    "InstrumentationsConfig", __base__=_Instrumentations, **{p.name: (bool, True) for p in PROBES})


class EbpfGoConfig(ComponentConfig):
    # No targets: every Go process on the host except the collector itself.
    targets: list[TargetConfig] = Field(default_factory=list)
    instrumentations: InstrumentationsConfig = Field(default_factory=InstrumentationsConfig)
    kernel_headers: str = "auto"
    ring_buffer_size: int = 1 << 22     # bytes per traced binary and probe; a power of two >= 4096
    max_inflight_calls: int = 16384     # per-call state entries (LRU) per binary and probe
    propagation: Literal["auto", "probe_write", "sk_msg", "stitch", "off"] = "auto"
    discovery_interval: Duration = 1.0  # how often /proc is scanned for new and exited processes
    program_linger: Duration = 30.0     # keep a binary's compiled programs this long after its last process
    include_db_statement: bool = False  # database_sql options (probes/database_sql.py)
    sanitize_db_statement: bool = True
    db_statement_max_length: int = 1024
    functions: list[FunctionConfig] = Field(default_factory=list)   # function spans (probes/functions)
    max_functions: int = 64             # functions one binary gets spans for, after globs are expanded
    # head sampling in BPF (sampler.py): {type: parentbased_traceidratio, ratio: 0.05}; none: all recorded
    sampler: SamplerConfig | None = None
    # Compiled BPF program images, reused across restarts ("" disables the disk cache).
    bpf_cache_dir: str = "/var/cache/otelgo-collector/bpf"

    @model_validator(mode="after")
    def _check(self) -> EbpfGoConfig:
        n = self.ring_buffer_size
        if n < 4096 or n & (n - 1):
            raise ValueError(f"ring_buffer_size: {n} must be a power of two of at least 4096 bytes, e.g. 1048576")
        if not 16 <= self.max_inflight_calls <= 1 << 20:
            raise ValueError(f"max_inflight_calls: {self.max_inflight_calls} must be between 16 and 1048576")
        if not 1 <= self.max_functions <= 512:
            raise ValueError(f"max_functions: {self.max_functions} must be between 1 and 512")
        if self.functions and not getattr(self.instrumentations, "functions", True):
            raise ValueError("functions: listed while instrumentations.functions is false; remove one of the two")
        if self.discovery_interval <= 0:
            raise ValueError("discovery_interval: must be greater than 0, e.g. 1s")
        return self


def probe_options(cfg: EbpfGoConfig) -> dict[str, Any]:
    """Each probe's options, read from this receiver's config by the probe itself."""
    return {p.name: p.options_from(cfg) for p in PROBES}


def selectors(cfg: EbpfGoConfig) -> list[discovery.Selector]:
    """The targets as discovery matches them (none: every Go process)."""
    return [discovery.Selector(t.exe_path, t.pid, t.name, t.open_ports, t.service_name, t.attributes)
            for t in cfg.targets]
