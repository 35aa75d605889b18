"""The collector's legacy `include`/`exclude` span matching (contrib internal/filter/filterspan).

Shared by the attributes and filter processors. A MatchProperties block matches a span when every
field it sets matches: `services` (any of, against resource `service.name`), `span_names` (any of),
`span_kinds` (any of), `attributes` (all of: key present, and equal / regexp-matching when a value is
given), `resources` (all of, on resource attributes), `libraries` (any of: scope name, and version
when given). `regexp: {cacheenabled, cachemaxnumentries}` remembers the answer per service, span or
library name. `match_type` is `strict` (equality) or `regexp` (unanchored search, like Go's `regexp.MatchString`). The span is processed if it matches `include` (when given) and does
not match `exclude` (when given).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from collector.spans import ResourceSpans, ScopeSpans, Span

SPAN_KINDS = {
    0: "SPAN_KIND_UNSPECIFIED", 1: "SPAN_KIND_INTERNAL", 2: "SPAN_KIND_SERVER", 3: "SPAN_KIND_CLIENT",
    4: "SPAN_KIND_PRODUCER", 5: "SPAN_KIND_CONSUMER",
}
_KIND_BY_NAME = {**{v: v for v in SPAN_KINDS.values()},
                 **{v.removeprefix("SPAN_KIND_").lower(): v for v in SPAN_KINDS.values()}}


def kind_name(text: str) -> str:
    """`SPAN_KIND_SERVER`, `Server` or `server` → `SPAN_KIND_SERVER`."""
    name = _KIND_BY_NAME.get(text) or _KIND_BY_NAME.get(text.lower())
    if name is None:
        raise ValueError(f'invalid span kind "{text}": use one of {", ".join(SPAN_KINDS.values())}')
    return name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttributeMatch(_Model):
    key: str
    value: Any = None


class LibraryMatch(_Model):
    name: str
    version: str | None = None


class RegexpOptions(_Model):
    cacheenabled: bool = False
    cachemaxnumentries: int = 0


class MatchProperties(_Model):
    match_type: str = ""
    regexp: RegexpOptions | None = None
    services: list[str] = Field(default_factory=list)
    span_names: list[str] = Field(default_factory=list)
    span_kinds: list[str] = Field(default_factory=list)
    attributes: list[AttributeMatch] = Field(default_factory=list)
    resources: list[AttributeMatch] = Field(default_factory=list)
    libraries: list[LibraryMatch] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> MatchProperties:
        if not (self.services or self.span_names or self.span_kinds or self.attributes or self.libraries
                or self.resources):
            raise ValueError('at least one of "services", "span_names", "span_kinds", "attributes", '
                             '"libraries" or "resources" field must be specified')
        if self.match_type not in ("strict", "regexp"):
            what = ("service name" if self.services else "span name" if self.span_names
                    else "attribute" if self.attributes else "filters")
            raise ValueError(f"error creating {what} filters: unrecognized match_type: '{self.match_type}', "
                             "valid types are: [regexp strict]")
        self.span_kinds = [kind_name(k) for k in self.span_kinds]
        if self.match_type == "regexp":
            for a in [*self.attributes, *self.resources]:
                if a.value is not None and not isinstance(a.value, str):
                    raise ValueError(f'error creating attribute filters: match_type=regexp for "{a.key}" '
                                     "needs a string value (a regular expression)")
            for p in [*self.services, *self.span_names, *(a.value for a in self.attributes if a.value),
                      *(a.value for a in self.resources if a.value), *(lib.name for lib in self.libraries)]:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f"error parsing regexp: {e}: `{p}`") from None
        return self


def _stringify(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, bytes):
        import base64

        return base64.b64encode(v).decode()
    return str(v)


class _Strings:
    """Exact strings, or patterns searched unanchored; with `regexp.cacheenabled`, each string's
    answer is remembered (the collector's LRU: at most `cachemaxnumentries`, 0 = no bound)."""

    def __init__(self, items: list[str], regexp: bool, options: RegexpOptions | None = None) -> None:
        self.exact = set(items) if not regexp else set()
        self.patterns = [re.compile(p) for p in items] if regexp else []
        self.cache: OrderedDict[str, bool] | None = (
            OrderedDict() if regexp and options is not None and options.cacheenabled else None)
        self.cache_size = options.cachemaxnumentries if options is not None else 0
        self._lock = threading.Lock()

    def matches(self, s: str) -> bool:
        if self.exact:
            return s in self.exact
        cache = self.cache
        if cache is None:
            return any(p.search(s) for p in self.patterns)
        with self._lock:  # receivers call a pipeline from several threads
            hit = cache.get(s)
            if hit is not None:
                cache.move_to_end(s)
                return hit
        hit = any(p.search(s) for p in self.patterns)
        with self._lock:
            cache[s] = hit
            if self.cache_size and len(cache) > self.cache_size:
                cache.popitem(last=False)
        return hit


class _Attrs:
    def __init__(self, items: list[AttributeMatch], regexp: bool) -> None:
        self.items: list[tuple[str, Any]] = []
        for a in items:
            if a.value is None:
                self.items.append((a.key, None))
            elif regexp:
                self.items.append((a.key, re.compile(a.value)))
            else:
                self.items.append((a.key, a.value))
        self.regexp = regexp

    def matches(self, attrs: dict[str, Any]) -> bool:
        for key, want in self.items:
            if key not in attrs:
                return False
            if want is None:
                continue
            have = attrs[key]
            if self.regexp:
                if not want.search(_stringify(have)):
                    return False
            elif type(have) is not type(want) and not (isinstance(have, int | float) and
                                                         isinstance(want, int | float) and
                                                         not isinstance(have, bool) and
                                                         not isinstance(want, bool)):
                return False
            elif have != want:
                return False
        return True


class Matcher:
    """One compiled MatchProperties block."""

    def __init__(self, mp: MatchProperties) -> None:
        rx = mp.match_type == "regexp"
        self.services = _Strings(mp.services, rx, mp.regexp) if mp.services else None
        self.names = _Strings(mp.span_names, rx, mp.regexp) if mp.span_names else None
        self.kinds = set(mp.span_kinds) if mp.span_kinds else None
        self.attrs = _Attrs(mp.attributes, rx) if mp.attributes else None
        self.resources = _Attrs(mp.resources, rx) if mp.resources else None
        self.libraries = [(_Strings([lib.name], rx, mp.regexp), lib.version) for lib in mp.libraries] or None

    def matches(self, rs: ResourceSpans, ss: ScopeSpans, span: Span) -> bool:
        if self.services is not None:
            svc = rs.resource.attributes.get("service.name")
            if svc is None or not self.services.matches(_stringify(svc)):
                return False
        if self.resources is not None and not self.resources.matches(rs.resource.attributes):
            return False
        if self.libraries is not None:
            if not any(n.matches(ss.scope.name) and (v is None or v == ss.scope.version)
                       for n, v in self.libraries):
                return False
        if self.names is not None and not self.names.matches(span.name):
            return False
        if self.kinds is not None and SPAN_KINDS.get(span.kind, "") not in self.kinds:
            return False
        if self.attrs is not None and not self.attrs.matches(span.attributes):
            return False
        return True


class IncludeExclude:
    """`include` then `exclude`: should this span be processed?"""

    def __init__(self, include: MatchProperties | None, exclude: MatchProperties | None) -> None:
        self.include = Matcher(include) if include else None
        self.exclude = Matcher(exclude) if exclude else None

    @property
    def always(self) -> bool:
        return self.include is None and self.exclude is None

    def selects(self, rs: ResourceSpans, ss: ScopeSpans, span: Span) -> bool:
        if self.include is not None and not self.include.matches(rs, ss, span):
            return False
        if self.exclude is not None and self.exclude.matches(rs, ss, span):
            return False
        return True
