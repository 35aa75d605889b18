"""attributes and resource processors: each action, value sources, include/exclude, errors."""

from __future__ import annotations

import hashlib
import struct

import pytest
from pydantic import ValidationError

from collector.spans import KIND_CLIENT, KIND_SERVER
from processors import attributes, resource
from processors.attributes import sha1_hash
from tests.unit.processors.helpers import make, one, span

BASE = {"http.method": "GET", "http.url": "http://x/users/42?token=abc", "count": "17", "ratio": 0.5,
        "ok": True, "n": 3, "user.email": "a@b.c"}

CASES = [
    # (actions, expected changes: key -> value, or None for deleted)
    ([{"key": "env", "value": "prod", "action": "insert"}], {"env": "prod"}),
    ([{"key": "http.method", "value": "POST", "action": "insert"}], {}),
    ([{"key": "http.method", "value": "POST", "action": "update"}], {"http.method": "POST"}),
    ([{"key": "absent", "value": "x", "action": "update"}], {}),
    ([{"key": "http.method", "value": "PUT", "action": "upsert"}, {"key": "new", "value": 1, "action": "upsert"}],
     {"http.method": "PUT", "new": 1}),
    ([{"key": "copy", "from_attribute": "n", "action": "insert"}], {"copy": 3}),
    ([{"key": "copy", "from_attribute": "missing", "action": "upsert"}], {}),
    ([{"key": "user.email", "action": "delete"}], {"user.email": None}),
    ([{"pattern": "^http\\.", "action": "delete"}], {"http.method": None, "http.url": None}),
    ([{"key": "user.email", "action": "hash"}], {"user.email": hashlib.sha1(b"a@b.c").hexdigest()}),
    ([{"key": "n", "action": "hash"}], {"n": hashlib.sha1(struct.pack("<q", 3)).hexdigest()}),
    ([{"key": "http.url", "pattern": "^http://[^/]+/(?P<first>[a-z]+)/(?P<id>\\d+)", "action": "extract"}],
     {"first": "users", "id": "42"}),
    ([{"key": "http.url", "pattern": "^ftp://(?P<host>.*)", "action": "extract"}], {}),
    ([{"key": "count", "action": "convert", "converted_type": "int"}], {"count": 17}),
    ([{"key": "count", "action": "convert", "converted_type": "double"}], {"count": 17.0}),
    ([{"key": "n", "action": "convert", "converted_type": "string"}], {"n": "3"}),
    ([{"key": "ratio", "action": "convert", "converted_type": "string"}], {"ratio": "0.5"}),
    ([{"key": "ok", "action": "convert", "converted_type": "int"}], {"ok": 1}),
    ([{"key": "http.method", "action": "convert", "converted_type": "int"}], {}),  # not a number: unchanged
    ([{"key": "a", "value": "1", "action": "insert"}, {"key": "a", "action": "convert", "converted_type": "int"},
      {"key": "b", "from_attribute": "a", "action": "upsert"}], {"a": 1, "b": 1}),  # actions run in order
]


@pytest.mark.parametrize("actions, changes", CASES)
def test_actions(actions, changes):
    p, sink, _ = make(attributes, {"actions": actions}, "attributes")
    p.consume(one(span(attrs=BASE)))
    expected = dict(BASE)
    for k, v in changes.items():
        if v is None:
            expected.pop(k)
        else:
            expected[k] = v
    assert sink.spans()[0].attributes == expected


@pytest.mark.parametrize("actions, changes", CASES)
def test_resource_processor_applies_the_same_actions(actions, changes):
    p, sink, _ = make(resource, {"attributes": actions}, "resource")
    batch = one(span(attrs={"x": 1}))
    batch.resource_spans[0].resource.attributes = dict(BASE)
    p.consume(batch)
    got = sink.batches[0].resource_spans[0].resource.attributes
    expected = dict(BASE)
    for k, v in changes.items():
        if v is None:
            expected.pop(k)
        else:
            expected[k] = v
    assert got == expected
    assert sink.spans()[0].attributes == {"x": 1}


SELECT = [
    # (include/exclude, span kwargs, service, processed?)
    ({"include": {"match_type": "strict", "services": ["svc"]}}, {}, "svc", True),
    ({"include": {"match_type": "strict", "services": ["other"]}}, {}, "svc", False),
    ({"include": {"match_type": "regexp", "services": ["^s.c$"]}}, {}, "svc", True),
    ({"include": {"match_type": "strict", "span_names": ["GET /a"]}}, {"name": "GET /a"}, "svc", True),
    ({"include": {"match_type": "regexp", "span_names": ["^GET"]}}, {"name": "POST /a"}, "svc", False),
    ({"include": {"match_type": "strict", "span_kinds": ["SPAN_KIND_SERVER"]}}, {"kind": KIND_SERVER}, "svc", True),
    ({"include": {"match_type": "strict", "span_kinds": ["server"]}}, {"kind": KIND_CLIENT}, "svc", False),
    ({"include": {"match_type": "strict", "attributes": [{"key": "n", "value": 3}]}}, {"attrs": {"n": 3}}, "svc", True),
    ({"include": {"match_type": "strict", "attributes": [{"key": "n", "value": "3"}]}}, {"attrs": {"n": 3}}, "svc",
     False),
    ({"include": {"match_type": "strict", "attributes": [{"key": "n"}]}}, {"attrs": {"n": 3}}, "svc", True),
    ({"include": {"match_type": "regexp", "attributes": [{"key": "u", "value": "^/api"}]}},
     {"attrs": {"u": "/api/v1"}}, "svc", True),
    ({"include": {"match_type": "strict", "services": ["svc"], "span_names": ["x"]}}, {"name": "y"}, "svc", False),
    ({"exclude": {"match_type": "strict", "services": ["svc"]}}, {}, "svc", False),
    ({"include": {"match_type": "strict", "services": ["svc"]},
      "exclude": {"match_type": "strict", "span_names": ["health"]}}, {"name": "health"}, "svc", False),
    ({"include": {"match_type": "strict", "libraries": [{"name": "lib"}]}}, {}, "svc", True),
    ({"include": {"match_type": "strict", "libraries": [{"name": "lib", "version": "2.0"}]}}, {}, "svc", False),
    ({"include": {"match_type": "strict", "resources": [{"key": "service.name", "value": "svc"}]}}, {}, "svc", True),
]


@pytest.mark.parametrize("sel, kw, service, processed", SELECT)
def test_include_exclude(sel, kw, service, processed):
    p, sink, _ = make(attributes, {"actions": [{"key": "touched", "value": True, "action": "upsert"}], **sel},
                      "attributes/sel")
    p.consume(one(span(**kw), service=service))
    assert ("touched" in sink.spans()[0].attributes) is processed


@pytest.mark.parametrize("cfg, message", [
    ({"actions": [{"key": "a", "value": 1}]}, 'missing required field "action" at the 0-th actions'),
    ({"actions": [{"key": "a", "value": 1, "action": "rename"}]}, 'unsupported action "rename"'),
    ({"actions": [{"value": 1, "action": "insert"}]}, 'missing required field "key"'),
    ({"actions": [{"key": "a", "action": "insert"}]}, 'Either field "value", "from_attribute" or "from_context"'),
    ({"actions": [{"key": "a", "value": 1, "from_attribute": "b", "action": "insert"}]}, "multiple value sources"),
    ({"actions": [{"action": "delete"}]}, 'Either field "key" or "pattern"'),
    ({"actions": [{"key": "a", "action": "extract"}]}, 'Field "pattern" is required for action "extract"'),
    ({"actions": [{"key": "a", "pattern": "(x)", "action": "extract"}]}, "no named matcher groups"),
    ({"actions": [{"key": "a", "action": "convert", "converted_type": "bool"}]}, 'invalid value "bool"'),
    ({"actions": [{"key": "a", "from_context": "metadata.x", "action": "insert"}]}, "from_context is not supported"),
    ({"actions": [{"key": "a", "value": 1, "action": "insert"}], "include": {"services": ["s"]}},
     "unrecognized match_type: '', valid types are: [regexp strict]"),
    ({"actions": [{"key": "a", "value": 1, "action": "insert"}], "include": {"match_type": "strict"}},
     'at least one of "services", "span_names"'),
    ({}, 'missing required field "actions"'),
])
def test_config_errors(cfg, message):
    with pytest.raises(ValidationError) as ei:
        attributes.factory.config_model.model_validate(cfg)
    assert message in str(ei.value)


def test_hash_encodings_match_contrib():
    assert sha1_hash("abc") == hashlib.sha1(b"abc").hexdigest()
    assert sha1_hash(True) == hashlib.sha1(b"\x01").hexdigest()
    assert sha1_hash(1.5) == hashlib.sha1(struct.pack("<d", 1.5)).hexdigest()
