"""Go's map layouts, as the BPF programs walk them (a request's or a Header's map[string][]string).

| layout  | Go versions                         | what the walk reads                               |
|---------|-------------------------------------|---------------------------------------------------|
| swiss   | >= 1.24 (unless GOEXPERIMENT=noswissmap) | Map.dirPtr/dirLen, table.groups.data/lengthMask |
| classic | <= 1.23, or noswissmap               | hmap.B, buckets, oldbuckets (+ overflow pointers) |

The offsets are the runtime's own (internal/runtime/maps identical in Go 1.24-1.27, runtime/map.go
before), the same in every build of one version: no DWARF is needed for them. Reference:
go-auto-instrumentation.md §8.1-8.2.
"""

from __future__ import annotations

from .binary import GoBinary

SWISS = {"SWISS_DIRPTR_POS": 16, "SWISS_DIRLEN_POS": 24, "SWISS_TABLE_GROUPS_POS": 16, "SWISS_TABLE_MASK_POS": 24}
CLASSIC = {"HMAP_B_POS": 9, "HMAP_BUCKETS_POS": 16, "HMAP_OLDBUCKETS_POS": 24}
MAP_COUNT_POS = 0   # entries, in both layouts (swiss Map.used, hmap.count): an empty map is not walked


def swiss_maps(binary: GoBinary) -> bool:
    """Go >= 1.24 uses swiss maps unless built with GOEXPERIMENT=noswissmap."""
    if binary.go_version_tuple < (1, 24, 0):
        return False
    return "noswissmap" not in binary.build.settings.get("GOEXPERIMENT", "")


def header_map_flags(binary: GoBinary) -> list[str]:
    """The -D constants of a BPF map walk for this binary's layout (SWISS_MAPS and its offsets)."""
    swiss = swiss_maps(binary)
    layout = SWISS if swiss else CLASSIC
    return [f"-DSWISS_MAPS={1 if swiss else 0}", *(f"-D{k}={v}" for k, v in layout.items()),
            f"-DMAP_COUNT_POS={MAP_COUNT_POS}"]
