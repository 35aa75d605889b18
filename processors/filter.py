"""`filter` processor: drop spans, by the collector's legacy matching or by OTTL-like conditions.

Two forms, as contrib's filterprocessor accepts them (one at a time):

- `spans: {include: ..., exclude: ...}` (processors.matching): a span is kept only if it matches
  `include` (when given) and does not match `exclude` (when given).
- `traces: {span: [condition, ...]}`: a span is dropped if ANY condition is true. The supported subset
  of OTTL:
    * paths: `name`, `kind`, `status.code`, `status.message`, `trace_state`, `attributes["k"]`,
      `resource.attributes["k"]`, `instrumentation_scope.name`, `instrumentation_scope.version`,
      `trace_id.string`, `span_id.string`, `parent_span_id.string`;
    * literals: "strings" (with \\" and \\\\ escapes), integers, floats, `true`, `false`, `nil`, the enums
      `SPAN_KIND_*` and `STATUS_CODE_*`;
    * operators: `==`, `!=`; `and`, `or`, `not`, parentheses;
    * the one function `IsMatch(path, "regexp")` (unanchored, RE2-style).
  Anything else (other functions, `<`/`>`, `spanevent` conditions, converters) is refused at config
  time with an error naming the condition and the unsupported part.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Kind, Processor
from collector.spans import ResourceSpans, ScopeSpans, Span, SpanBatch
from collector.telemetry import ComponentTelemetry
from processors.matching import IncludeExclude, MatchProperties

ENUMS = {
    "SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2, "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5,
    "STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2,
}

Ctx = tuple[ResourceSpans, ScopeSpans, Span]
Getter = Callable[[Ctx], Any]

_PATHS: dict[str, Getter] = {
    "name": lambda c: c[2].name,
    "kind": lambda c: c[2].kind,
    "status.code": lambda c: c[2].status_code,
    "status.message": lambda c: c[2].status_message,
    "trace_state": lambda c: c[2].trace_state,
    "instrumentation_scope.name": lambda c: c[1].scope.name,
    "instrumentation_scope.version": lambda c: c[1].scope.version,
    "trace_id.string": lambda c: c[2].trace_id.hex(),
    "span_id.string": lambda c: c[2].span_id.hex(),
    "parent_span_id.string": lambda c: c[2].parent_span_id.hex(),
}
SUPPORTED = ("paths name, kind, status.code, status.message, trace_state, attributes[\"k\"], "
             "resource.attributes[\"k\"], instrumentation_scope.name, instrumentation_scope.version, "
             "trace_id.string, span_id.string, parent_span_id.string; operators == and !=; and, or, not, "
             "parentheses; the function IsMatch(path, \"regexp\")")


class ConditionError(ValueError):
    pass


_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
""", re.VERBOSE)


def _tokenize(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ConditionError(f"unexpected character {text[pos]!r} at offset {pos}")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group()))
        pos = m.end()
    return out


def _unquote(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), s[1:-1])


def _equal(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if type(a) is not type(b):
        return False
    return bool(a == b)


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        t = self.peek()
        if t is None:
            raise ConditionError("unexpected end of condition" + (f", expected {value!r}" if value else ""))
        if value is not None and t[1] != value:
            raise ConditionError(f"expected {value!r}, found {t[1]!r}")
        self.i += 1
        return t

    def parse(self) -> Callable[[Ctx], bool]:
        e = self.or_expr()
        if self.peek() is not None:
            raise ConditionError(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return e

    def or_expr(self) -> Callable[[Ctx], bool]:
        parts = [self.and_expr()]
        while self.peek() == ("ident", "or"):
            self.take()
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else (lambda c: any(p(c) for p in parts))

    def and_expr(self) -> Callable[[Ctx], bool]:
        parts = [self.not_expr()]
        while self.peek() == ("ident", "and"):
            self.take()
            parts.append(self.not_expr())
        return parts[0] if len(parts) == 1 else (lambda c: all(p(c) for p in parts))

    def not_expr(self) -> Callable[[Ctx], bool]:
        if self.peek() == ("ident", "not"):
            self.take()
            inner = self.not_expr()
            return lambda c: not inner(c)
        return self.primary()

    def primary(self) -> Callable[[Ctx], bool]:
        t = self.peek()
        if t == ("punct", "("):
            self.take()
            e = self.or_expr()
            self.take(")")
            return e
        if t is not None and t[0] == "ident" and self.i + 1 < len(self.toks) and self.toks[self.i + 1][1] == "(":
            return self.function()
        left = self.operand()
        op = self.peek()
        if op is None or op[0] != "op":
            if t is not None and t[1] in ("true", "false"):
                value = t[1] == "true"
                return lambda c: value
            raise ConditionError(f"expected == or != after {t[1] if t else 'operand'!r}")
        self.take()
        if op[1] not in ("==", "!="):
            raise ConditionError(f"operator {op[1]} is not supported (supported: == and !=)")
        right = self.operand()
        if op[1] == "==":
            return lambda c: _equal(left(c), right(c))
        return lambda c: not _equal(left(c), right(c))

    def function(self) -> Callable[[Ctx], bool]:
        name = self.take()[1]
        if name != "IsMatch":
            raise ConditionError(f"function {name}() is not supported (supported: IsMatch)")
        self.take("(")
        target = self.operand()
        self.take(",")
        kind, pat = self.take()
        if kind != "str":
            raise ConditionError("IsMatch needs a string literal as its pattern")
        self.take(")")
        try:
            rx = re.compile(_unquote(pat))
        except re.error as e:
            raise ConditionError(f"invalid regexp {pat}: {e}") from None

        def is_match(c: Ctx) -> bool:
            v = target(c)
            if v is None:
                return False
            if not isinstance(v, str):
                from processors.attributes import as_string

                v = as_string(v)
            return rx.search(v) is not None
        return is_match

    def operand(self) -> Getter:
        kind, text = self.take()
        if kind == "str":
            s = _unquote(text)
            return lambda c: s
        if kind == "num":
            n: int | float = float(text) if any(ch in text for ch in ".eE") else int(text)
            return lambda c: n
        if kind != "ident":
            raise ConditionError(f"unexpected {text!r}")
        if text in ("true", "false"):
            b = text == "true"
            return lambda c: b
        if text == "nil":
            return lambda c: None
        if text in ENUMS:
            e = ENUMS[text]
            return lambda c: e
        if text in ("attributes", "resource.attributes"):
            self.take("[")
            k, key = self.take()
            if k != "str":
                raise ConditionError(f"{text}[...] needs a string key")
            self.take("]")
            key = _unquote(key)
            if self.peek() == ("punct", "["):
                raise ConditionError("nested indexing (attributes[\"a\"][\"b\"]) is not supported")
            if text == "attributes":
                return lambda c: c[2].attributes.get(key)
            return lambda c: c[0].resource.attributes.get(key)
        if text in _PATHS:
            return _PATHS[text]
        raise ConditionError(f"path or name {text!r} is not supported")


def compile_condition(text: str) -> Callable[[Ctx], bool]:
    try:
        return _Parser(text).parse()
    except ConditionError as e:
        raise ValueError(f'unable to parse OTTL condition "{text}": {e}. otelgo-collector supports a subset '
                         f"of OTTL: {SUPPORTED}") from None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpansMatch(_Model):
    include: MatchProperties | None = None
    exclude: MatchProperties | None = None


class TracesConditions(_Model):
    span: list[str] = Field(default_factory=list)
    spanevent: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> TracesConditions:
        if self.spanevent:
            raise ValueError("traces.spanevent conditions are not supported by otelgo-collector; "
                             "use traces.span")
        for cond in self.span:
            compile_condition(cond)
        return self


class Config(ComponentConfig):
    error_mode: Literal["propagate", "ignore", "silent"] = "propagate"
    spans: SpansMatch | None = None
    traces: TracesConditions | None = None

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.spans is not None and self.traces is not None and self.traces.span:
            raise ValueError("cannot use ottl conditions and include/exclude for spans at the same time")
        return self


class FilterProcessor(Processor):
    mutates_data = False  # filter_spans builds new containers; spans are not changed

    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, next_consumer: Consumer,
                 config: Config) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.select: IncludeExclude | None = None
        self.conditions: list[Callable[[Ctx], bool]] = []
        if config.spans is not None and (config.spans.include or config.spans.exclude):
            self.select = IncludeExclude(config.spans.include, config.spans.exclude)
        if config.traces is not None:
            self.conditions = [compile_condition(c) for c in config.traces.span]
        m = telemetry.metrics
        self._filtered = m.counter("otelcol_processor_filter_spans_filtered",
                                   "Number of spans dropped by the filter processor", ["filter"]).labels(str(id))

    def _keep(self, rs: ResourceSpans, ss: ScopeSpans, span: Span) -> bool:
        if self.select is not None and not self.select.selects(rs, ss, span):
            return False
        if self.conditions:
            c = (rs, ss, span)
            for cond in self.conditions:
                if cond(c):
                    return False
        return True

    def consume(self, batch: SpanBatch) -> None:
        n = batch.span_count()
        if self.select is None and not self.conditions:
            out = batch
        else:
            out = batch.filter_spans(self._keep)
        kept = out.span_count()
        if kept < n:
            self._filtered.inc(n - kept)
        if kept:
            self.next_consumer.consume(out)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry,
            next_consumer: Consumer) -> FilterProcessor:
    return FilterProcessor(id, telemetry, next_consumer, config)


factory = Factory(
    type="filter", kind=Kind.PROCESSOR, config_model=Config, create=_create, stability="alpha",
    description="Drops spans matching include/exclude rules or OTTL-like conditions.",
)
