"""processors/README.md documents every option of our processors' config models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from processors import (
    attributes,
    filter,
    matching,
    memory_limiter,
    probabilistic_sampler,
    resource,
    tail_sampling,
)
from processors.tail_sampling import SharedPolicyCfg

README = (Path(__file__).resolve().parents[3] / "processors" / "README.md").read_text()


def section(name: str) -> str:
    m = re.search(rf"^## {re.escape(name)}\b.*?(?=^## |\Z)", README, re.M | re.S)
    assert m, f"no section for {name}"
    return m.group(0)


@pytest.mark.parametrize("name, model", [
    ("attributes", attributes.Config), ("resource", resource.Config), ("filter", filter.Config),
    ("probabilistic_sampler", probabilistic_sampler.Config), ("memory_limiter", memory_limiter.Config),
    ("attributes", matching.MatchProperties), ("tail_sampling", tail_sampling.Config),
    ("tail_sampling", SharedPolicyCfg),
])
def test_every_option_is_documented(name, model):
    text = section(name)
    missing = [o for o in model.model_fields if f"`{o}`" not in text and f"`{o}." not in text]
    assert not missing, f"undocumented in processors/README.md ({name}): {missing}"


def test_every_action_is_documented():
    text = section("attributes")
    assert all(f"| `{a}` |" in text for a in attributes.ACTIONS)
