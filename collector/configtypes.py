"""Value types shared by component config models: durations, endpoints, sizes."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Go duration syntax (`5s`, `200ms`, `1m30s`) to seconds. A bare 0 is allowed."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: use a number with a unit, e.g. 5s or 200ms")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise ValueError(f"invalid duration {value!r}: add a unit, e.g. {value}s or {value}ms")
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: use a string such as 5s or 200ms")
    text = value.strip()
    if text in ("0", ""):
        if text == "":
            raise ValueError("invalid duration \"\": use a value such as 5s or 200ms")
        return 0.0
    sign = 1.0
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(f'invalid duration "{value}": use a number with a unit (ns, us, ms, s, m, h), e.g. 5s')
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return sign * total


def _non_negative_duration(value: object) -> float:
    d = parse_duration(value)
    if d < 0:
        raise ValueError(f'invalid duration "{value}": must not be negative')
    return d


# Seconds as float, written in YAML the Go way.
Duration = Annotated[float, BeforeValidator(_non_negative_duration)]


def split_host_port(endpoint: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[::1]:port` or `:port` (host defaults to all interfaces as in Go)."""
    text = endpoint.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f'endpoint "{endpoint}" has no port: write it as host:port, e.g. localhost:4317')
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'endpoint "{endpoint}" has an invalid port "{port_text}"')
    return host, int(port_text)


def _endpoint(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"invalid endpoint {value!r}: write it as host:port, e.g. localhost:4317")
    split_host_port(value)
    return value


# A `host:port` listening or dialing address, validated.
Endpoint = Annotated[str, BeforeValidator(_endpoint)]
