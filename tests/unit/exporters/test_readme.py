"""exporters/README.md documents every option of the otlp and otlphttp config models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from exporters import otlp, otlphttp

README = (Path(__file__).resolve().parents[3] / "exporters" / "README.md").read_text()


def section(name: str) -> str:
    m = re.search(rf"^## {re.escape(name)}\b.*?(?=^## |\Z)", README, re.M | re.S)
    assert m, f"no section for {name}"
    return m.group(0)


def options(model: type[BaseModel], prefix: str = "", nested: bool = True) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if nested and isinstance(ann, type) and issubclass(ann, BaseModel):
            out += options(ann, f"{prefix}{name}.", nested=False)
        else:
            out.append(prefix + name)
    return out


@pytest.mark.parametrize("name, model, nested", [("otlp", otlp.OTLPConfig, True),
                                                 ("otlphttp", otlphttp.OTLPHTTPConfig, False)])
def test_every_option_is_documented(name, model, nested):
    text = section(name)
    missing = [o for o in options(model, nested=nested) if f"`{o}`" not in text and f"`{o}." not in text]
    assert not missing, f"undocumented in exporters/README.md ({name}): {missing}"
