"""YAML as the Go collector reads it: YAML 1.2 booleans, duplicate keys refused, aliases bounded.

PyYAML's safe loader speaks YAML 1.1, which differs from the Go collector (yaml.v3) where users
notice: `propagation: off` or `insecure: yes` become booleans, a key written twice silently keeps
the last value, and a billion-laughs document (aliases of aliases) expands to gigabytes when we
walk it to expand ${env:...}. Each is fixed here, once, for every config source.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

# How many values a document may expand to once its aliases are followed. The largest real
# collector configs have a few thousand; an alias bomb reaches this in ten lines.
MAX_EXPANDED_VALUES = 1_000_000


class YAMLProblem(ValueError):
    """A problem with the document itself; `line` is 1-based, 0 when unknown."""

    def __init__(self, problem: str, line: int = 0, column: int = 0) -> None:
        super().__init__(problem)
        self.problem, self.line, self.column = problem, line, column


class CollectorLoader(yaml.SafeLoader):
    """SafeLoader with the core schema's booleans and yaml.v3's duplicate-key rule."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; its keys may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it below, in its own words
            if first is not None:
                raise YAMLProblem(f'mapping key "{key}" already defined at line {first}',
                                  key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 (core schema) booleans only: on/off/yes/no/y/n stay strings, as in the Go collector.
CollectorLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
CollectorLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _expanded_size(node: Node, memo: dict[int, int]) -> int:
    """Values in `node` with every alias followed (aliases are shared nodes: memoised by id)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    size = 1
    if isinstance(node, SequenceNode):
        size += sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def load(text: str) -> Any:
    """One YAML document → Python values; YAMLProblem for anything the collector would refuse."""
    loader = CollectorLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_EXPANDED_VALUES:
            raise YAMLProblem(f"document contains excessive aliasing (more than {MAX_EXPANDED_VALUES:,} "
                              "values once aliases are expanded)")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise YAMLProblem(problem, mark.line + 1 if mark else 0, mark.column + 1 if mark else 0) from None
    except RecursionError:
        raise YAMLProblem("document nests too deeply") from None
    finally:
        loader.dispose()
