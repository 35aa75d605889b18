"""Routes of the web frameworks that route for themselves, for the net/http server span.

A gin, echo, chi or gorilla/mux service is an `http.Handler`: every request still passes
`serverHandler.ServeHTTP`, so the server probe makes its span, but the ServeMux pattern it reads is
empty. The framework knows the matched template once it has routed, and keeps it in its own struct
(table below), assigned once per routing and only when a route matched. The route probe sits on a
kernel-emulated instruction at that assignment (`GoBinary.point_at_field_store`: ~0.6 µs, once per
request, never per middleware or per path segment): after the stores, reading the field through the
register that holds the struct, or, where the function ends or jumps away right after them (echo,
mux), at the write barrier's jcc by the stores, reading the words from the registers they are about
to be stored from. It puts the template's string header into the server call of the same goroutine
(the handler runs on the goroutine of ServeHTTP, HTTP/1.x and HTTP/2 alike). The server's end reads
the template's bytes instead of the ServeMux pattern. Template strings live in the framework's
route tree for the program's life.

- gin, echo, mux: a later assignment on the same goroutine (gin's HandleContext, an internal
  redirect) replaces the route: the span carries the route that served.
- chi routes level by level: a router mounted or nested (`Mount`, `Route`) routes again with its
  part of the path, and chi's `RoutePattern()` is the parts joined, with `/*/` made `/` and the
  trailing slash cut. The chi probe appends each level's part (up to ROUTE_PARTS) and the span's
  route is made from them by chi's rule (`chi_route`).
- mux keeps a pointer to the matched `*Route`; its template is two reads further
  (`Route.routeConf.regexp.path.template`). A route without a path template (host or header
  matchers only) has no `http.route`.

It is part of the server probe's program (nethttp_server.c, `ROUTE_PROBES`), not a probe of its own:
it only ever adds to a server span, and sharing the program lets it write the server's per-call
state in place (no map of its own, nothing more for the server to look up).

| framework  | where the template is assigned                          | field                        |
|------------|---------------------------------------------------------|------------------------------|
| gin        | `gin.(*Engine).handleHTTPRequest`                       | `gin.Context.fullPath`       |
| echo v4    | `echo.(*Router).Find`                                   | `echo.context.path`          |
| chi v5     | `chi.(*node).FindRoute`                                 | `chi.Context.routePattern` (appended) |
| gorilla/mux| `mux.(*Route).Match` (`match.Route = r`)                | `mux.RouteMatch.Route` -> `routeConf.regexp.path.template` |
"""

from __future__ import annotations

from dataclasses import dataclass

from ...gobinary import GoBinary
from ..spec import Offset, ProbeUnavailable, offset_flags


@dataclass(frozen=True)
class RouteSource:
    """A framework whose matched route template a probe reads: the function that assigns it to a
    field of the framework's request struct, a string, or (`via`) a pointer to a struct from which
    the template string is reached."""

    framework: str   # how inspect and the logs name it; the BPF function is uprobe_route_<framework>
    module: str      # its Go module (the version comes from the binary's build info)
    function: str
    struct: str
    field: str
    append: bool = False   # each assignment adds a part (chi's levels) instead of replacing the route
    # (struct, field) steps from the pointed-to struct: the last but one leads to a pointer, the last
    # is the template string; empty: the field is the template itself
    via: tuple[tuple[str, str], ...] = ()

    def offset(self, struct: str, field: str) -> Offset:
        # strict: a stripped binary of a release the table does not know is not guessed at
        return Offset(f"ROUTE_{self.framework.upper()}_{field.upper()}", struct, field, None, strict=True)

    @property
    def offsets(self) -> tuple[Offset, ...]:
        return tuple(self.offset(s, f) for s, f in ((self.struct, self.field), *self.via))


GIN = RouteSource("gin", "github.com/gin-gonic/gin", "github.com/gin-gonic/gin.(*Engine).handleHTTPRequest",
                  "github.com/gin-gonic/gin.Context", "fullPath")
ECHO = RouteSource("echo", "github.com/labstack/echo/v4", "github.com/labstack/echo/v4.(*Router).Find",
                   "github.com/labstack/echo/v4.context", "path")
CHI = RouteSource("chi", "github.com/go-chi/chi/v5", "github.com/go-chi/chi/v5.(*node).FindRoute",
                  "github.com/go-chi/chi/v5.Context", "routePattern", append=True)
MUX = RouteSource("mux", "github.com/gorilla/mux", "github.com/gorilla/mux.(*Route).Match",
                  "github.com/gorilla/mux.RouteMatch", "Route",
                  via=(("github.com/gorilla/mux.Route", "routeConf"), ("github.com/gorilla/mux.routeConf", "regexp"),
                       ("github.com/gorilla/mux.routeRegexpGroup", "path"),
                       ("github.com/gorilla/mux.routeRegexp", "template")))
SOURCES: tuple[RouteSource, ...] = (GIN, ECHO, CHI, MUX)

# pt_regs field of each register a struct address or a word may sit in at the probe point
PT_REGS = {"rax": "ax", "rbx": "bx", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di", "rbp": "bp",
           **{f"r{n}": f"r{n}" for n in range(8, 16)}}


@dataclass(frozen=True)
class RoutePlan:
    """Whether and where one framework's route is read in one binary."""

    source: RouteSource
    version: str     # the framework module's version ("" when the build info does not say)
    addr: int        # 0: the route probe is off for this binary (reason says why)
    words: tuple[str, ...]  # C expression of each word of the field at addr (ROUTE_REG/ROUTE_MEM)
    offsets: tuple[int, ...]  # of the field, then of each `via` step
    reason: str

    @property
    def program(self) -> str:
        return f"uprobe_route_{self.source.framework}"

    @property
    def macro(self) -> str:
        src = self.source
        if src.via:   # the pointer word, the offset of the next pointer from it, of the template from that
            *to_ptr, to_str = self.offsets[1:]
            return f"ROUTE_PROBE_VIA({src.framework},{self.words[0]},{sum(to_ptr)},{to_str})"
        return f"ROUTE_PROBE({src.framework},{int(src.append)},{self.words[0]},{self.words[1]})"


def route_plans(gb: GoBinary) -> list[RoutePlan]:
    """A plan for every framework linked into the binary (none: no framework routes there)."""
    plans = []
    for src in SOURCES:
        if gb.function(src.function) is None:
            continue
        version = gb.modules.get(src.module, "")
        try:
            found = offset_flags(gb, src.offsets)
        except ProbeUnavailable as e:
            plans.append(RoutePlan(src, version, 0, (), (), str(e)))
            continue
        offs = tuple(found[o.const] for o in src.offsets)
        n = 1 if src.via else 2
        p = gb.point_at_field_store(src.function, offs[0], n)
        field = f"{src.struct}.{src.field} (+{offs[0]})"
        if not p.addr:
            plans.append(RoutePlan(src, version, 0, (), offs, f"no point at the assignment of {field} in "
                                                              f"{src.function}: {p.reason}"))
            continue
        regs = [p.base, *(w for w in p.words if w)]
        bad = [r for r in regs if r not in PT_REGS]
        if bad:
            plans.append(RoutePlan(src, version, 0, (), offs, f"{field}: a word is in {bad[0]}"))
            continue
        words = tuple(f"ROUTE_REG({PT_REGS[w]})" if w else f"ROUTE_MEM({PT_REGS[p.base]},{offs[0] + 8 * k})"
                      for k, w in enumerate(p.words))
        plans.append(RoutePlan(src, version, p.addr, words, offs, f"{field}: {p.reason}"))
    return plans


def route_flags(plans: list[RoutePlan]) -> list[str]:
    """-DROUTE_PROBES: one ROUTE_PROBE/ROUTE_PROBE_VIA per plan that attaches."""
    probes = " ".join(p.macro for p in plans if p.addr)
    return [f"-DROUTE_PROBES={probes}"] if probes else []


def route_points(plans: list[RoutePlan]) -> list[tuple[int, str]]:
    return [(p.addr, p.program) for p in plans if p.addr]


def route_report(plans: list[RoutePlan]) -> list[dict[str, object]]:
    """`inspect`'s view: which framework, which version, attached where or why not."""
    return [{"framework": p.source.framework, "module": p.source.module, "version": p.version,
             "attach": bool(p.addr), "addr": p.addr, "reason": p.reason} for p in plans]


def chi_route(parts: str) -> str:
    """chi's `Context.RoutePattern()` of the parts a request's routers matched, joined: every `/*/`
    (a mount point's wildcard followed by the sub-router's part) made `/`, then one trailing `//`
    and one trailing `/` cut (not from `/` itself)."""
    while "/*/" in parts:
        parts = parts.replace("/*/", "/")
    if parts != "/":
        parts = parts.removesuffix("//").removesuffix("/")
    return parts
