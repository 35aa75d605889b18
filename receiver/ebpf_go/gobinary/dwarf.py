"""Struct member offsets from the DWARF of a Go binary (when it was not built with `-w`).

Go's linker puts all type DIEs at the top level of a few compile units (those named "runtime"
in current toolchains), with the qualified type name (`net/http.Request`). We index top-level
`DW_TAG_structure_type` DIEs by name, scanning the "runtime" units, and the others only when those
hold no struct (a toolchain that places types elsewhere), and read `DW_AT_data_member_location` of
the named `DW_TAG_member`.
"""

from __future__ import annotations

from typing import Any

from elftools.elf.elffile import ELFFile


class DwarfError(ValueError):
    pass


class DwarfStructs:
    def __init__(self, elf: ELFFile) -> None:
        try:
            self._dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
        except Exception as e:  # corrupt or unsupported DWARF
            raise DwarfError(f"unreadable DWARF: {type(e).__name__}: {e}") from e
        self._index: dict[str, Any] = {}
        self._scanned_runtime = False
        self._scanned_all = False

    def _scan(self, runtime_only: bool) -> None:
        for cu in self._dwarf.iter_CUs():
            top = cu.get_top_DIE()
            name_attr = top.attributes.get("DW_AT_name")
            name = name_attr.value.decode("utf-8", "replace") if name_attr is not None else ""
            is_runtime = name == "runtime"
            if runtime_only != is_runtime:
                continue
            for die in top.iter_children():
                if die.tag == "DW_TAG_structure_type":
                    n = die.attributes.get("DW_AT_name")
                    if n is not None:
                        self._index.setdefault(n.value.decode("utf-8", "replace"), die)

    def struct(self, name: str) -> Any | None:
        try:
            if not self._scanned_runtime:
                self._scanned_runtime = True
                self._scan(runtime_only=True)
            # Every Go toolchain from 1.19 to 1.27 puts all its type DIEs in the "runtime" units; the
            # other units (1-4 s of parsing) are read only when those held no struct at all.
            if name not in self._index and not self._index and not self._scanned_all:
                self._scanned_all = True
                self._scan(runtime_only=False)
        except Exception as e:
            raise DwarfError(f"unreadable DWARF: {type(e).__name__}: {e}") from e
        return self._index.get(name)

    def has_struct(self, name: str) -> bool:
        return self.struct(name) is not None

    def member_offset(self, struct: str, field: str) -> int | None:
        """Offset of `field` in `struct`; None when the struct or the field is absent."""
        die = self.struct(struct)
        if die is None:
            return None
        try:
            for child in die.iter_children():
                if child.tag != "DW_TAG_member":
                    continue
                n = child.attributes.get("DW_AT_name")
                if n is None or n.value.decode("utf-8", "replace") != field:
                    continue
                loc = child.attributes.get("DW_AT_data_member_location")
                if loc is None:
                    return 0
                if isinstance(loc.value, int):
                    return loc.value
                # Old-style location expression: DW_OP_plus_uconst <uleb>
                raw = list(loc.value)
                if raw and raw[0] == 0x23:
                    value = shift = 0
                    for b in raw[1:]:
                        value |= (b & 0x7F) << shift
                        shift += 7
                        if b < 0x80:
                            break
                    return value
                return None
        except Exception as e:
            raise DwarfError(f"unreadable DWARF: {type(e).__name__}: {e}") from e
        return None

    def struct_size(self, struct: str) -> int | None:
        die = self.struct(struct)
        if die is None:
            return None
        a = die.attributes.get("DW_AT_byte_size")
        return int(a.value) if a is not None else None
