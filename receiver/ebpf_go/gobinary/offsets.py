"""The bundled struct-offset table (`offsets.json`, written by `tools/gen_offsets.py`).

Layout: `{"schema": 1, "modules": {module: {"versions": [...], "fields": {struct: {field:
{version: offset|null}}}}}}`, where module "std" is the Go standard library keyed by Go version
without the "go" prefix ("1.24.11") and other modules by their module version ("v1.69.4"). null means
the field does not exist in that version.

Lookup: the exact version gives source "table". Any other version is a "guess" from the nearest
known version, preferring one of the same minor release (Go layouts do not normally change within
a minor release), else the closest older, else the closest newer; the detail says which and
whether the known neighbours disagree.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

TABLE_FILE = "offsets.json"


@dataclass(frozen=True)
class TableHit:
    offset: int | None  # None: the field does not exist there
    source: str  # "table" | "guess"
    detail: str
    agreed: bool = True  # a guess from the same minor release, or between neighbours that agree


def version_key(version: str) -> tuple[int, ...]:
    """Sortable key of a Go ("1.24.11", "go1.24.11") or module ("v1.69.4") version.

    Module pseudo-versions ("v0.0.0-20240604185151-ef581f913117", "v0.46.1-0.20251013234738-...")
    sort by their timestamp, before the release they precede.
    """
    v = version.strip().removeprefix("go").removeprefix("v")
    core, _, rest = v.partition("-")
    core = core.split("+")[0].split(" ")[0]
    nums = []
    for part in core.split("."):
        m = re.match(r"\d+", part)
        nums.append(int(m.group(0)) if m else 0)
    while len(nums) < 3:
        nums.append(0)
    ts = re.search(r"(\d{14})", rest)
    release = 0 if rest else 1
    return (*nums[:3], release, int(ts.group(1)) if ts else 0)


@cache
def load_table() -> dict[str, Any]:
    try:
        text = resources.files(__package__).joinpath(TABLE_FILE).read_text()
    except (FileNotFoundError, OSError):
        return {"schema": 1, "modules": {}}
    data: dict[str, Any] = json.loads(text)
    return data


class OffsetTable:
    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self._data = data if data is not None else load_table()

    def modules(self) -> list[str]:
        return list(self._data.get("modules", {}))

    def versions(self, module: str) -> list[str]:
        return list(self._data.get("modules", {}).get(module, {}).get("versions", []))

    def lookup(self, module: str, version: str, struct: str, field: str) -> TableHit | None:
        mod = self._data.get("modules", {}).get(module)
        if mod is None:
            return None
        per_version: dict[str, int | None] | None = mod.get("fields", {}).get(struct, {}).get(field)
        if not per_version:
            return None
        norm = version.removeprefix("go") if module == "std" else version
        if norm in per_version:
            return TableHit(per_version[norm], "table", f"{module}@{norm}")
        want = version_key(norm)
        known = sorted(per_version, key=version_key)
        same_minor = [k for k in known if version_key(k)[:2] == want[:2]]
        pool = same_minor or known
        older = [k for k in pool if version_key(k) < want]
        newer = [k for k in pool if version_key(k) > want]
        equal = [k for k in pool if version_key(k) == want]
        pick = equal[0] if equal else older[-1] if older else newer[0]
        why = ("same minor release, " if same_minor else "") + (
            "same version" if equal else "closest older" if older else "closest newer")
        older = [k for k in known if version_key(k) < want]
        newer = [k for k in known if version_key(k) > want]
        lo = per_version[older[-1]] if older else None
        hi = per_version[newer[0]] if newer else None
        agree = older and newer and lo == hi
        note = "; neighbours agree" if agree else ("; neighbours DISAGREE" if older and newer else "")
        return TableHit(per_version[pick], "guess", f"{module}@{norm} not in table: using {pick} ({why}{note})",
                        bool(same_minor or agree))
