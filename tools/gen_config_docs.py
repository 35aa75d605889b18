"""Write the component option tables of README.md from the config models, so the two never disagree.

Run: .venv/bin/python tools/gen_config_docs.py        (rewrites README.md between the markers)
     .venv/bin/python tools/gen_config_docs.py --check (exit 1 when README.md is stale; used by tests)
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector.component import Kind  # noqa: E402
from collector.registry import load_factories  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- BEGIN GENERATED: component options (tools/gen_config_docs.py) -->"
END = "<!-- END GENERATED -->"


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base = typing.get_args(ann)[0]
        meta = typing.get_args(ann)[1:]
        names = " ".join(str(getattr(m, "func", m)) for m in meta)
        if "duration" in names:
            return "duration"
        if "endpoint" in names:
            return "host:port"
        return _type_name(base)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        args = typing.get_args(ann)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "map"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _field_type(field: Any) -> str:
    names = " ".join(str(getattr(m, "func", m)) for m in field.metadata)
    if "duration" in names:
        return "duration"
    if "endpoint" in names:
        return "host:port"
    return _type_name(field.annotation)


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(see below)"
    if isinstance(value, float) and _field_type(field) == "duration":
        return f"{value:g}s"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if value == [] or value == {} or value == "":
        return "empty"
    return f"`{value}`"


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        desc = (field.description or "").replace("\n", " ")
        rows.append(f"| `{key}` | {_field_type(field)} | {_default(field)} | {desc} |")
        sub = field.annotation
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("doc_expand") is False:
            continue        # a nested copy of a section documented above (its description says which)
        for cand in [sub, *typing.get_args(sub)]:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                rows += _rows(cand, key + ".")
                break
    return rows


def render() -> str:
    factories = load_factories()
    out = [BEGIN, ""]
    for kind in (Kind.RECEIVER, Kind.PROCESSOR, Kind.EXPORTER, Kind.EXTENSION):
        seen = sorted({f.type: f for (k, _), f in factories.items() if k == kind}.items())
        for type_name, f in seen:
            aliases = f" (also accepted as {', '.join(f'`{a}`' for a in f.aliases)})" if f.aliases else ""
            out.append(f"#### {kind.value} `{type_name}`{aliases}")
            out.append("")
            if f.description:
                desc = f.description.rstrip(".")
                out.append(f"{desc[0].upper()}{desc[1:]}. Stability: {f.stability}.")
                out.append("")
            rows = _rows(f.config_model)
            if rows:
                out += ["| option | type | default | notes |", "|---|---|---|---|", *rows]
            else:
                out.append("No options.")
            out.append("")
    out.append(END)
    return "\n".join(out)


def main() -> int:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the markers {BEGIN!r} … {END!r}", file=sys.stderr)
        return 1
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = head + render() + tail
    if "--check" in sys.argv:
        if new != text:
            print("README.md component options are stale: run .venv/bin/python tools/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
