"""The struct fields the probes read, per Go package: what `tools/gen_offsets.py` puts in the
table and what `inspect` reports. Keys are DWARF type names (package path + "." + type name)."""

from __future__ import annotations

STD_FIELDS: dict[str, tuple[str, ...]] = {
    "runtime.g": ("stack", "stackguard0", "m", "goid"),
    "net/http.Request": (
        "Method", "URL", "Proto", "ProtoMajor", "ProtoMinor", "Header", "Body", "ContentLength",
        "Host", "RemoteAddr", "RequestURI", "TLS", "ctx", "Pattern", "pat",
    ),
    "net/http.pattern": ("str",),
    "net/http.Response": ("Status", "StatusCode", "Proto", "Header", "Request"),
    "net/http.response": ("conn", "req", "status", "wroteHeader", "handlerHeader", "contentLength", "w"),
    "net/http.conn": ("server", "rwc", "remoteAddr", "tlsState"),
    # HTTP/2 server (bundled in net/http up to Go 1.26, net/http/internal/http2 from 1.27)
    "net/http.http2responseWriter": ("rws",),
    "net/http.http2responseWriterState": ("status",),
    "net/http/internal/http2.responseWriter": ("rws",),
    "net/http/internal/http2.responseWriterState": ("status",),
    "net/http.persistConn": ("conn", "bw", "br"),
    "net/http.Server": ("Addr", "Handler"),
    "net/url.URL": (
        "Scheme", "Opaque", "User", "Host", "Path", "RawPath", "OmitHost", "ForceQuery", "RawQuery",
        "Fragment", "RawFragment",
    ),
    "net/url.Userinfo": ("username", "password", "passwordSet"),
    "net/textproto.Reader": ("R",),
    "bufio.Writer": ("err", "buf", "n", "wr"),
    "bufio.Reader": ("buf", "rd", "r", "w"),
    "net.TCPAddr": ("IP", "Port", "Zone"),
    "net.TCPConn": ("conn",),
    "net.conn": ("fd",),
    "net.netFD": ("pfd", "family", "sotype", "laddr", "raddr"),
    "internal/poll.FD": ("Sysfd",),
    "crypto/tls.Conn": ("conn", "isClient"),
    "context.valueCtx": ("Context", "key", "val"),
    "context.cancelCtx": ("Context",),
    "context.timerCtx": ("cancelCtx", "deadline"),
    "context.withoutCancelCtx": ("c",),
    "database/sql.DB": ("connector", "numOpen"),
    "database/sql.driverConn": ("db", "ci", "inUse"),
    "database/sql.Conn": ("db", "dc"),
    "database/sql.Tx": ("db", "dc", "txi", "ctx"),
    "database/sql.Stmt": ("db", "query", "cg"),
    "runtime.hmap": ("count", "flags", "B", "buckets", "oldbuckets", "extra"),
    "internal/runtime/maps.Map": ("used", "seed", "dirPtr", "dirLen", "globalDepth", "clearSeq"),
    "internal/runtime/maps.table": ("used", "capacity", "groups"),
}

# Module packages: module path -> {struct -> fields}
MODULE_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "google.golang.org/grpc": {
        "google.golang.org/grpc.ClientConn": ("ctx", "target", "authority"),
        "google.golang.org/grpc.clientStream": ("callHdr", "cc", "ctx", "attempt"),
        "google.golang.org/grpc.csAttempt": ("t", "s", "transport", "transportStream"),
        "google.golang.org/grpc/internal/transport.Stream": ("id", "ctx", "method", "st"),
        "google.golang.org/grpc/internal/transport.ServerStream": ("Stream", "st"),
        "google.golang.org/grpc/internal/transport.ClientStream": ("Stream", "ct"),
        "google.golang.org/grpc/internal/transport.http2Client": ("nextID", "ctx", "framer", "localAddr", "remoteAddr"),
        # remoteAddr/localAddr in older versions (v1.56.3 still), one peer (peer.Peer) by v1.60.1
        "google.golang.org/grpc/internal/transport.http2Server": ("peer", "remoteAddr", "localAddr", "ctx", "framer"),
        "google.golang.org/grpc/internal/transport.CallHdr": ("Method", "Host"),
        "google.golang.org/grpc/internal/transport.headerFrame": ("streamID", "hf"),
        "google.golang.org/grpc/internal/transport.clientHeaders": ("streamID", "hf"),
        "google.golang.org/grpc/internal/status.Error": ("s",),
        "google.golang.org/grpc/internal/status.Status": ("s",),
        "google.golang.org/grpc/peer.Peer": ("Addr", "LocalAddr", "AuthInfo"),
    },
    "golang.org/x/net": {
        "golang.org/x/net/http2.MetaHeadersFrame": ("HeadersFrame", "Fields", "Truncated"),
        "golang.org/x/net/http2.FrameHeader": ("Type", "Flags", "Length", "StreamID"),
        "golang.org/x/net/http2/hpack.HeaderField": ("Name", "Value", "Sensitive"),
    },
    "google.golang.org/genproto/googleapis/rpc": {
        "google.golang.org/genproto/googleapis/rpc/status.Status": ("Code", "Message", "Details"),
    },
    "github.com/gin-gonic/gin": {
        "github.com/gin-gonic/gin.Context": ("Request", "handlers", "index", "fullPath"),
    },
    "github.com/labstack/echo/v4": {
        "github.com/labstack/echo/v4.context": ("path",),
    },
    "github.com/go-chi/chi/v5": {
        "github.com/go-chi/chi/v5.Context": ("routePattern",),
    },
    "github.com/gorilla/mux": {
        "github.com/gorilla/mux.RouteMatch": ("Route",),
        "github.com/gorilla/mux.Route": ("routeConf",),
        "github.com/gorilla/mux.routeConf": ("regexp",),
        "github.com/gorilla/mux.routeRegexpGroup": ("path",),
        "github.com/gorilla/mux.routeRegexp": ("template",),
    },
}
