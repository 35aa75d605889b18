"""Read Go executables: version, modules, functions, return sites, probe points, struct offsets.

    from receiver.ebpf_go.gobinary import GoBinary, BinaryError
    b = GoBinary.open("/usr/local/bin/server")
    b.function("net/http.serverHandler.ServeHTTP"), b.return_sites(...), b.entry_probe(...)
    b.struct_offset("net/http.Request", "Method")

See README.md in this folder for what is read from where and the fallbacks.
"""

from .binary import FieldOffset, Function, GoBinary, ProbePoint, ReturnPoint
from .errors import BinaryError, NotGoBinary

__all__ = ["BinaryError", "NotGoBinary", "FieldOffset", "Function", "GoBinary", "ProbePoint", "ReturnPoint"]
