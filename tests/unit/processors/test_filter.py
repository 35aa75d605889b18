"""filter processor: legacy include/exclude and the OTTL subset; unsupported conditions are refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from collector.spans import KIND_CLIENT, KIND_SERVER, STATUS_ERROR
from processors import filter as filterproc
from tests.unit.processors.helpers import make, one, span

HEALTH = span("GET /healthz", {"http.route": "/healthz", "http.status_code": 200}, kind=KIND_SERVER)
USERS = span("GET /users", {"http.route": "/users", "http.status_code": 500, "retry": True}, kind=KIND_SERVER,
             status_code=STATUS_ERROR)
CALL = span("SELECT", {"db.system": "postgresql", "ratio": 0.25}, kind=KIND_CLIENT)

OTTL = [
    # (conditions, spans dropped among HEALTH, USERS, CALL)
    (['attributes["http.route"] == "/healthz"'], {"GET /healthz"}),
    (['name == "GET /healthz"'], {"GET /healthz"}),
    (["kind == SPAN_KIND_SERVER"], {"GET /healthz", "GET /users"}),
    (["kind == 3"], {"SELECT"}),
    (["kind != SPAN_KIND_SERVER"], {"SELECT"}),
    (['attributes["http.status_code"] == 500'], {"GET /users"}),
    (['attributes["http.status_code"] == "500"'], set()),  # types differ: not equal
    (['attributes["missing"] == nil'], {"GET /healthz", "GET /users", "SELECT"}),
    (['attributes["db.system"] != nil'], {"SELECT"}),
    (['attributes["ratio"] == 0.25'], {"SELECT"}),
    (['attributes["retry"] == true'], {"GET /users"}),
    (["status.code == STATUS_CODE_ERROR"], {"GET /users"}),
    (['kind == SPAN_KIND_SERVER and attributes["http.status_code"] == 200'], {"GET /healthz"}),
    (['name == "SELECT" or attributes["http.route"] == "/users"'], {"SELECT", "GET /users"}),
    (['not (kind == SPAN_KIND_SERVER)'], {"SELECT"}),
    (['kind == SPAN_KIND_SERVER and (name == "x" or attributes["retry"] == true)'], {"GET /users"}),
    (['IsMatch(name, "^GET /h")'], {"GET /healthz"}),
    (['IsMatch(attributes["http.route"], "users$")'], {"GET /users"}),
    (['IsMatch(attributes["http.status_code"], "^5")'], {"GET /users"}),  # ints are matched as strings
    (['IsMatch(attributes["nope"], ".*")'], set()),
    (['resource.attributes["service.name"] == "svc"'], {"GET /healthz", "GET /users", "SELECT"}),
    (['instrumentation_scope.name == "lib"'], {"GET /healthz", "GET /users", "SELECT"}),
    (['name == "a \\"quoted\\" name"'], set()),
    (['name == "GET /healthz"', 'name == "SELECT"'], {"GET /healthz", "SELECT"}),  # any condition drops
]


def run(cfg):
    p, sink, t = make(filterproc, cfg, "filter")
    for s in (HEALTH, USERS, CALL):
        p.consume(one(s.copy()))
    return {s.name for s in sink.spans()}, t


@pytest.mark.parametrize("conditions, dropped", OTTL)
def test_ottl_subset(conditions, dropped):
    kept, t = run({"traces": {"span": conditions}})
    assert kept == {"GET /healthz", "GET /users", "SELECT"} - dropped
    filtered = t.metrics.registry.get_sample_value("otelcol_processor_filter_spans_filtered_total", {"filter": "filter"})
    assert (filtered or 0) == len(dropped)


LEGACY = [
    ({"include": {"match_type": "strict", "span_names": ["SELECT"]}}, {"SELECT"}),
    ({"exclude": {"match_type": "regexp", "span_names": ["^GET"]}}, {"SELECT"}),
    ({"exclude": {"match_type": "strict", "attributes": [{"key": "http.route", "value": "/healthz"}]}},
     {"GET /users", "SELECT"}),
    ({"include": {"match_type": "strict", "span_kinds": ["SPAN_KIND_SERVER"]},
      "exclude": {"match_type": "strict", "span_names": ["GET /healthz"]}}, {"GET /users"}),
    ({"include": {"match_type": "strict", "services": ["other"]}}, set()),
]


@pytest.mark.parametrize("spans, kept", LEGACY)
def test_legacy_include_exclude(spans, kept):
    got, _ = run({"spans": spans})
    assert got == kept


@pytest.mark.parametrize("condition, fragment", [
    ('attributes["a"] > 3', "operator > is not supported"),
    ('Len(name) == 3', "function Len() is not supported"),
    ('span.name == "x"', "path or name 'span.name' is not supported"),
    ('attributes["a"]["b"] == "x"', "nested indexing"),
    ('name == ', "unexpected end of condition"),
    ('name == "x" xor kind == 1', "unexpected 'xor'"),
    ('IsMatch(name, name)', "IsMatch needs a string literal"),
    ('name == "x" ;', "unexpected character"),
])
def test_unsupported_conditions_are_refused(condition, fragment):
    with pytest.raises(ValidationError) as ei:
        filterproc.factory.config_model.model_validate({"traces": {"span": [condition]}})
    text = str(ei.value)
    assert "unable to parse OTTL condition" in text and fragment in text and "supports a subset" in text


def test_other_config_errors():
    with pytest.raises(ValidationError, match="spanevent conditions are not supported"):
        filterproc.factory.config_model.model_validate({"traces": {"spanevent": ['name == "x"']}})
    with pytest.raises(ValidationError, match="cannot use ottl conditions and include/exclude"):
        filterproc.factory.config_model.model_validate(
            {"spans": {"include": {"match_type": "strict", "span_names": ["a"]}}, "traces": {"span": ["kind == 1"]}})


def test_all_dropped_sends_nothing_downstream():
    p, sink, _ = make(filterproc, {"traces": {"span": ["true"]}}, "filter")
    p.consume(one(span()))
    assert sink.batches == []


def test_regexp_cache_remembers_answers_within_its_bound():
    from processors.matching import MatchProperties, _Strings

    mp = MatchProperties.model_validate({"match_type": "regexp", "span_names": ["^GET /api"],
                                         "regexp": {"cacheenabled": True, "cachemaxnumentries": 2}})
    names = _Strings(mp.span_names, True, mp.regexp)
    assert names.cache is not None
    assert [names.matches(n) for n in ("GET /api/a", "POST /x", "GET /api/a", "GET /api/b")] == [True, False, True, True]
    assert list(names.cache.items()) == [("GET /api/a", True), ("GET /api/b", True)]  # LRU: "POST /x" left first
    off = MatchProperties.model_validate({"match_type": "regexp", "span_names": ["^GET"]})
    assert _Strings(off.span_names, True, off.regexp).cache is None
