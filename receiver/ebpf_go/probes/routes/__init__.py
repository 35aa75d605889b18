"""Routes of the web frameworks that route for themselves, for the net/http server span.

A gin service is an `http.Handler`: every request still passes `serverHandler.ServeHTTP`, so the
server probe makes its span, but the ServeMux pattern it reads is empty. The framework knows the
matched template once it has routed, and keeps it in its own struct: gin assigns
`c.fullPath = value.fullPath` in `(*Engine).handleHTTPRequest` only when a route matched, just before
it runs the handlers (`c.Next()`). The route probe sits on the first instruction after that
assignment that the kernel emulates (`GoBinary.point_after_field_store`: ~0.6 µs, once per request,
never per middleware or per path segment), reads the field's string header through the register
that holds the struct there, and puts it into the server call of the same goroutine (the handler runs
on the goroutine of ServeHTTP, HTTP/1.x and HTTP/2 alike). The server's end reads the template's
bytes instead of the ServeMux pattern. A later assignment on the same goroutine (gin's
HandleContext, an internal redirect) replaces it: the span carries the route that served.

It is part of the server probe's program (nethttp_server.c, `ROUTE_PROBES`), not a probe of its own:
it only ever adds to a server span, and sharing the program lets it write the server's per-call
state in place (no map of its own, nothing more for the server to look up).

| framework | where the template is assigned                       | field              |
|-----------|------------------------------------------------------|--------------------|
| gin       | `github.com/gin-gonic/gin.(*Engine).handleHTTPRequest` | `gin.Context.fullPath` |
"""

from __future__ import annotations

from dataclasses import dataclass

from ...gobinary import GoBinary
from ..spec import Offset, ProbeUnavailable, offset_flags


@dataclass(frozen=True)
class RouteSource:
    """A framework whose matched route template a probe reads: the function that assigns it to a
    string field of the framework's request struct."""

    framework: str   # how inspect and the logs name it; the BPF function is uprobe_route_<framework>
    module: str      # its Go module (the version comes from the binary's build info)
    function: str
    struct: str
    field: str

    @property
    def offset(self) -> Offset:
        # strict: a stripped binary of a release the table does not know is not guessed at
        return Offset(f"ROUTE_{self.framework.upper()}_POS", self.struct, self.field, None, strict=True)


GIN = RouteSource("gin", "github.com/gin-gonic/gin", "github.com/gin-gonic/gin.(*Engine).handleHTTPRequest",
                  "github.com/gin-gonic/gin.Context", "fullPath")
SOURCES = (GIN,)

# pt_regs field of each register a struct address may sit in at the probe point
PT_REGS = {"rax": "ax", "rbx": "bx", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di", "rbp": "bp",
           **{f"r{n}": f"r{n}" for n in range(8, 16)}}


@dataclass(frozen=True)
class RoutePlan:
    """Whether and where one framework's route is read in one binary."""

    source: RouteSource
    version: str     # the framework module's version ("" when the build info does not say)
    addr: int        # 0: the route probe is off for this binary (reason says why)
    register: str    # pt_regs field holding the struct's address at addr
    offset: int      # of the template field in the struct
    reason: str

    @property
    def program(self) -> str:
        return f"uprobe_route_{self.source.framework}"


def route_plans(gb: GoBinary) -> list[RoutePlan]:
    """A plan for every framework linked into the binary (none: no framework routes there)."""
    plans = []
    for src in SOURCES:
        if gb.function(src.function) is None:
            continue
        version = gb.modules.get(src.module, "")
        try:
            off = offset_flags(gb, (src.offset,))[src.offset.const]
        except ProbeUnavailable as e:
            plans.append(RoutePlan(src, version, 0, "", 0, str(e)))
            continue
        p = gb.point_after_field_store(src.function, off)
        reg = PT_REGS.get(p.base, "")
        if p.addr and not reg:
            plans.append(RoutePlan(src, version, 0, "", off, f"the struct's address is in {p.base}"))
            continue
        plans.append(RoutePlan(src, version, p.addr, reg, off,
                               f"{src.struct}.{src.field} (+{off}): {p.reason}" if p.addr
                               else f"no point after the assignment of {src.struct}.{src.field} in "
                                    f"{src.function}: {p.reason}"))
    return plans


def route_flags(plans: list[RoutePlan]) -> list[str]:
    """-DROUTE_PROBES: one ROUTE_PROBE(framework, register, offset) per plan that attaches."""
    probes = " ".join(f"ROUTE_PROBE({p.source.framework},{p.register},{p.offset})" for p in plans if p.addr)
    return [f"-DROUTE_PROBES={probes}"] if probes else []


def route_points(plans: list[RoutePlan]) -> list[tuple[int, str]]:
    return [(p.addr, p.program) for p in plans if p.addr]


def route_report(plans: list[RoutePlan]) -> list[dict[str, object]]:
    """`inspect`'s view: which framework, which version, attached where or why not."""
    return [{"framework": p.source.framework, "module": p.source.module, "version": p.version,
             "attach": bool(p.addr), "addr": p.addr, "reason": p.reason} for p in plans]
