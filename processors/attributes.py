"""`attributes` processor: insert, update, upsert, delete, hash, extract and convert span attributes.

As contrib's attributesprocessor: `actions` run in order on every span selected by `include`/`exclude`
(processors.matching). The same action engine serves the `resource` processor on resource attributes.
`from_context` is not supported (we have no request metadata here) and is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from typing import Any

from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Kind, Processor
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry
from processors.matching import IncludeExclude, MatchProperties

ACTIONS = ("insert", "update", "upsert", "delete", "hash", "extract", "convert")
_MISSING = object()


class ActionConfig(ComponentConfig):
    key: str = ""
    action: str = ""
    value: Any = None
    from_attribute: str = ""
    from_context: str = ""
    pattern: str = ""
    converted_type: str = ""


def _validate_actions(actions: list[ActionConfig]) -> None:
    """The collector's attraction errors (contrib internal/coreinternal/attraction)."""
    for i, a in enumerate(actions):
        act = a.action.lower()
        if not act:
            raise ValueError(f'error creating AttrProc due to missing required field "action" at the {i}-th actions')
        if act not in ACTIONS:
            raise ValueError(f'error creating AttrProc due to unsupported action "{a.action}" at the {i}-th actions')
        if a.from_context:
            raise ValueError(f'from_context is not supported by otelgo-collector (at the {i}-th actions): use '
                             '"value" or "from_attribute"')
        if act in ("insert", "update", "upsert"):
            if not a.key:
                raise ValueError(f'error creating AttrProc due to missing required field "key" at the {i}-th actions')
            sources = (a.value is not None) + bool(a.from_attribute)
            if sources == 0:
                raise ValueError(f'error creating AttrProc. Either field "value", "from_attribute" or '
                                 f'"from_context" setting must be specified for {i}-th action')
            if sources > 1:
                raise ValueError(f"error creating AttrProc due to multiple value sources being set at the "
                                 f"{i}-th actions")
        elif act in ("delete", "hash"):
            if not a.key and not a.pattern:
                raise ValueError(f'error creating AttrProc. Either field "key" or "pattern" setting must be '
                                 f'specified for {i}-th action')
            if a.pattern:
                _compile(a.pattern, act, i)
        elif act == "extract":
            if not a.key:
                raise ValueError(f'error creating AttrProc due to missing required field "key" at the {i}-th actions')
            if not a.pattern:
                raise ValueError(f'error creating AttrProc. Field "pattern" is required for action "extract" '
                                 f"at the {i}-th action")
            rx = _compile(a.pattern, act, i)
            if not rx.groupindex:
                raise ValueError(f'error creating AttrProc. Field "pattern" contains no named matcher groups '
                                 f"at the {i}-th actions")
        elif act == "convert":
            if not a.key:
                raise ValueError(f'error creating AttrProc due to missing required field "key" at the {i}-th actions')
            if a.converted_type not in ("int", "double", "string"):
                raise ValueError(f'error creating AttrProc due to invalid value "{a.converted_type}" in field '
                                 f'"converted_type" for action "convert" at the {i}-th action')


def _compile(pattern: str, action: str, i: int) -> re.Pattern[str]:
    # Go's RE2 names groups (?P<name>...) or (?<name>...); Python 3.11 knows only the first.
    try:
        return re.compile(re.sub(r"\(\?<([A-Za-z_][A-Za-z0-9_]*)>", r"(?P<\1>", pattern))
    except re.error as e:
        raise ValueError(f'error creating AttrProc due to invalid value "{pattern}" in field "pattern" for '
                         f'action "{action}" at the {i}-th action: {e}') from None


def sha1_hash(v: Any) -> str:
    """contrib's sha1Hasher: strings as bytes, bools as one byte, ints/doubles as 8 bytes little-endian."""
    if isinstance(v, str):
        raw = v.encode()
    elif isinstance(v, bool):
        raw = b"\x01" if v else b"\x00"
    elif isinstance(v, int):
        raw = struct.pack("<q", v)
    elif isinstance(v, float):
        raw = struct.pack("<d", v)
    else:
        return ""
    return hashlib.sha1(raw).hexdigest() if raw else ""


def go_format_double(f: float) -> str:
    """pcommon Value.AsString() for a double: strconv.FormatFloat(f, 'f', -1, 64)."""
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    r = repr(f)
    if "e" in r or "E" in r:
        from decimal import Decimal

        r = format(Decimal(r), "f")
    if r.endswith(".0"):
        r = r[:-2]
    return r


def as_string(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return go_format_double(v)
    if isinstance(v, bytes):
        import base64

        return base64.b64encode(v).decode()
    if v is None:
        return ""
    if isinstance(v, list | dict):
        import json

        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _convert(v: Any, to: str) -> Any:
    if to == "string":
        return as_string(v)
    if to == "int":
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return int(v) if math.isfinite(v) else _MISSING
        if isinstance(v, str):
            try:
                return int(v.strip(), 10)
            except ValueError:
                return _MISSING
        return _MISSING
    if to == "double":
        if isinstance(v, bool):
            return 1.0 if v else 0.0
        if isinstance(v, int | float):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return _MISSING
        return _MISSING
    return _MISSING


class AttrActions:
    """The compiled action list; apply(attrs) edits a dict in place."""

    def __init__(self, actions: list[ActionConfig]) -> None:
        self.steps: list[tuple[str, ActionConfig, re.Pattern[str] | None]] = []
        for i, a in enumerate(actions):
            act = a.action.lower()
            rx = _compile(a.pattern, act, i) if a.pattern else None
            self.steps.append((act, a, rx))

    def apply(self, attrs: dict[str, Any]) -> None:
        for act, a, rx in self.steps:
            if act in ("insert", "update", "upsert"):
                if a.from_attribute:
                    if a.from_attribute not in attrs:
                        continue
                    value = attrs[a.from_attribute]
                else:
                    value = a.value
                present = a.key in attrs
                if (act == "insert" and present) or (act == "update" and not present):
                    continue
                attrs[a.key] = value
            elif act == "delete":
                if a.key:
                    attrs.pop(a.key, None)
                if rx is not None:
                    for k in [k for k in attrs if rx.search(k)]:
                        del attrs[k]
            elif act == "hash":
                keys = [a.key] if a.key and a.key in attrs else []
                if rx is not None:
                    keys += [k for k in attrs if rx.search(k) and k != a.key]
                for k in keys:
                    attrs[k] = sha1_hash(attrs[k])
            elif act == "extract":
                v = attrs.get(a.key)
                if not isinstance(v, str) or rx is None:
                    continue
                m = rx.search(v)
                if m:
                    for name, val in m.groupdict().items():
                        if val is not None:
                            attrs[name] = val
            elif act == "convert":
                if a.key in attrs:
                    nv = _convert(attrs[a.key], a.converted_type)
                    if nv is not _MISSING:
                        attrs[a.key] = nv


class Config(ComponentConfig):
    actions: list[ActionConfig] = Field(default_factory=list)
    include: MatchProperties | None = None
    exclude: MatchProperties | None = None

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.actions:
            raise ValueError('missing required field "actions"')
        _validate_actions(self.actions)
        return self


class AttributesProcessor(Processor):
    mutates_data = True

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer,
                 config: Config) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.actions = AttrActions(config.actions)
        self.select = IncludeExclude(config.include, config.exclude)

    def consume(self, batch: SpanBatch) -> None:
        always = self.select.always
        apply = self.actions.apply
        for rs in batch.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if always or self.select.selects(rs, ss, span):
                        apply(span.attributes)
        self.next_consumer.consume(batch)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> AttributesProcessor:
    return AttributesProcessor(id, telemetry, next_consumer, config)


factory = Factory(
    type="attributes", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="beta",
    description="Inserts, updates, deletes, hashes, extracts or converts span attributes.",
)
