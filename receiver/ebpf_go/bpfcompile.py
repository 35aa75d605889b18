"""Compile one BPF C file with BCC in a child process and print its program image.

    python -m receiver.ebpf_go.bpfcompile < request.json > image.json

The collector never imports BCC or LLVM: it runs this module as a child (one per compile), which
compiles exactly as BCC does in-process (`-I bpf/`, the probe's -D flags, BCC_KERNEL_SOURCE) and
extracts what the kernel needs to load the result again: each function's instructions, the
license, every map (as the kernel reports it), where the code refers to a map (ld_imm64 of a map
fd: a relocation by map name), and which maps are pinned under which file name. The child pins
into a temporary directory of its own (PIN_DIR is replaced), so the image depends neither on the
collector's pin directory nor on its pid, and can be cached (images.ImageStore).

Request: {"source": path, "cflags": [...], "kernel_source": path or null}
Answer (stdout, one JSON object): {"image": {...}} or {"error": "..."}; clang's diagnostics go to
stderr, which the parent reads for the one-line error message.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bpfsys

IMAGE_FORMAT = 1


@dataclass(frozen=True)
class MapImage:
    name: str              # the table name in the C source
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    pin: str | None        # file name under PIN_DIR, for BPF_TABLE_PINNED maps


@dataclass
class ProgramImage:
    """A compiled BPF file, loadable with bpfsys alone."""

    source: str
    license: str
    functions: dict[str, bytes]                                   # name -> instructions
    maps: list[MapImage]
    relocations: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # fn -> [(insn, map)]

    def to_json(self) -> dict[str, Any]:
        return {"format": IMAGE_FORMAT, "source": self.source, "license": self.license,
                "functions": {k: base64.b64encode(v).decode() for k, v in self.functions.items()},
                "maps": [m.__dict__ for m in self.maps],
                "relocations": {k: [list(r) for r in v] for k, v in self.relocations.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProgramImage:
        if d.get("format") != IMAGE_FORMAT:
            raise ValueError(f"image format {d.get('format')!r}, expected {IMAGE_FORMAT}")
        img = cls(str(d["source"]), str(d["license"]),
                  {str(k): base64.b64decode(v) for k, v in d["functions"].items()},
                  [MapImage(**m) for m in d["maps"]],
                  {str(k): [(int(i), str(n)) for i, n in v] for k, v in d["relocations"].items()})
        names = {m.name for m in img.maps}
        for fn, relocs in img.relocations.items():
            code = img.functions[fn]
            for i, n in relocs:
                if n not in names or not 0 <= i < len(code) // 8:
                    raise ValueError(f"relocation {fn}[{i}] -> {n} is invalid")
        return img


def replace_pin_dir(cflags: list[str], pin_dir: str) -> list[str]:
    return [f'-DPIN_DIR="{pin_dir}"' if f.startswith("-DPIN_DIR=") else f for f in cflags]


def remove_pin_dir(pin_dir: str) -> None:
    """Unlink what BCC pinned (bpffs files one by one), then the directory."""
    with contextlib.suppress(OSError):
        for root, _dirs, files in os.walk(pin_dir, topdown=False):
            for f in files:
                os.unlink(os.path.join(root, f))
            os.rmdir(root)


def compile_image(source: str, cflags: list[str], kernel_source: str | None,
                  pin_dir: str | None = None) -> ProgramImage:
    """In the child: compile with BCC and extract the image. Raises what BCC raises. Pinned maps
    go to `pin_dir` (an empty bpffs directory the parent removes afterwards, even if we crash),
    else to a temporary directory of our own."""
    import bcc  # type: ignore[import-not-found]

    if kernel_source:
        os.environ["BCC_KERNEL_SOURCE"] = kernel_source
    lib = bcc.lib
    own = pin_dir is None
    if pin_dir is None:
        pin_dir = tempfile.mkdtemp(prefix="otelgo-compile-", dir="/sys/fs/bpf")
    try:
        b = bcc.BPF(src_file=source.encode(), cflags=replace_pin_dir(cflags, pin_dir))
        mod = b.module
        lib.bpf_module_license.restype = ctypes.c_char_p
        license = (lib.bpf_module_license(mod) or b"GPL").decode()
        lib.bpf_table_name.restype = ctypes.c_char_p
        by_id: dict[int, str] = {}
        fd_name: dict[int, str] = {}
        specs: list[tuple[str, bpfsys.MapSpec]] = []
        for i in range(lib.bpf_num_tables(mod)):
            name = lib.bpf_table_name(mod, i).decode()
            fd = lib.bpf_table_fd_id(mod, i)
            if fd < 0:
                continue
            fd_name[fd] = name
            by_id[bpfsys.map_id(fd)] = name
            specs.append((name, bpfsys.map_info(fd)))
        pins: dict[str, str] = {}
        for root, _dirs, files in os.walk(pin_dir):
            for f in files:
                path = os.path.join(root, f)
                pfd = bpfsys.obj_get(path)
                try:
                    name = by_id.get(bpfsys.map_id(pfd))
                finally:
                    os.close(pfd)
                if name is not None:
                    pins[name] = os.path.relpath(path, pin_dir)
        maps = [MapImage(n, s.type, s.key_size, s.value_size, s.max_entries, s.flags, pins.get(n))
                for n, s in specs]
        lib.bpf_function_name.restype = ctypes.c_char_p
        lib.bpf_function_start.restype = ctypes.c_void_p
        lib.bpf_function_size.restype = ctypes.c_size_t
        functions: dict[str, bytes] = {}
        relocations: dict[str, list[tuple[int, str]]] = {}
        for i in range(lib.bpf_num_functions(mod)):
            fname = lib.bpf_function_name(mod, i)
            start, size = lib.bpf_function_start(mod, fname), lib.bpf_function_size(mod, fname)
            if not start or not size:
                continue
            code = bytearray(ctypes.string_at(start, size))
            rel = []
            for idx, fd in bpfsys.map_fd_relocations(bytes(code)):
                if fd not in fd_name:
                    raise RuntimeError(f"{fname.decode()}: instruction {idx} loads unknown map fd {fd}")
                rel.append((idx, fd_name[fd]))
                bpfsys.patch_imm(code, idx, 0)  # the image is the same whatever fds the child had
            functions[fname.decode()] = bytes(code)
            relocations[fname.decode()] = rel
        with contextlib.suppress(Exception):
            b.cleanup()
        return ProgramImage(Path(source).name, license, functions, maps, relocations)
    finally:
        if own:
            remove_pin_dir(pin_dir)


def main() -> int:
    try:
        import bcc  # type: ignore[import-not-found]  # noqa: F401  (import first: a missing BCC is its own error)
    except ImportError as e:
        print(json.dumps({"error": f"BCC is not importable ({e})", "kind": "import"}), flush=True)
        return 3
    req = json.loads(sys.stdin.read())
    try:
        img = compile_image(req["source"], list(req["cflags"]), req.get("kernel_source"), req.get("pin_dir"))
    except Exception as e:  # BCC raises plain Exception; clang's diagnostics went to stderr
        text = str(e).strip()
        print(json.dumps({"error": text.splitlines()[-1] if text else repr(e)}), flush=True)
        return 1
    print(json.dumps({"image": img.to_json(), "bcc_version": getattr(bcc, "__version__", "")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
