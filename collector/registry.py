"""Component type → factory: the only place that lists components.

Each component module exposes `factory` (a collector.component.Factory). Add a line here to ship one.
"""

from __future__ import annotations

import importlib

from collector.component import Factory, Kind

_MODULES = (
    "receiver.otlp",
    "receiver.ebpf_go.receiver",
    "processors.batch",
    "exporters.debug",
    "exporters.file",
    "exporters.otlp",
    "exporters.otlphttp",
    "processors.attributes",
    "processors.resource",
    "processors.filter",
    "processors.probabilistic_sampler",
    "processors.tail_sampling",
    "processors.memory_limiter",
    "extensions.health_check",
)


def load_factories() -> dict[tuple[Kind, str], Factory]:
    """Import every component module and index its factory by (kind, type) and aliases."""
    out: dict[tuple[Kind, str], Factory] = {}
    for name in _MODULES:
        f: Factory = importlib.import_module(name).factory
        out[(f.kind, f.type)] = f
        for alias in f.aliases:
            out[(f.kind, alias)] = f
    return out
