/* nethttp_client.c: one CLIENT span per net/http request, and the trace context for sk_msg.
 *
 * Hooks (amd64 regabi):
 *   `net/http.(*Transport).roundTrip(t, req *Request) (*Response, error)`
 *     entry (jcc after the stack check): word 2 = req. Choose span ids here; the parent is the
 *       server span whose request context this request's ctx descends from (walk of the Go
 *       context chain over `ctx_spans` (ctx_spans.h), filled by nethttp_server.c).
 *     every RET: RAX = *Response, RBX/RCX = error (itab, data). Emit one record.
 *   `net/http.(*Request).write(r, w io.Writer, ...)` entry: runs on the transport's writeLoop
 *     goroutine, just before the request bytes are flushed to the socket. Finds the client span by
 *     the request's Header map (shared by the clones roundTrip makes), reads the connection's
 *     local and remote address from Go memory (w = *bufio.Writer -> persistConnWriter{pc} ->
 *     pc.conn -> *net.TCPConn, or a wrapper whose first field is that net.Conn (non-PIE: itabs
 *     known) -> netFD.laddr/raddr), and, with SKMSG, leaves the trace context in
 *     `tp_pending` keyed by that connection for propagation/skmsg_traceparent.c; with PROBE_WRITE, arms
 *     the writer for this goroutine.
 *   `net/http.Header.writeSubset` entry, only with PROBE_WRITE (traceparent_probe_write.h): writes
 *     the traceparent line into the request's bufio buffer.
 *
 * Constants (-D, from probes/nethttp_client PROBE): REQ_*_POS, URL_*_POS,
 * USERINFO_PASSWORDSET_POS, RESP_*_POS, BUFIO_WR_POS, PCONN_CONN_POS, NETFD_LADDR_POS,
 * NETFD_RADDR_POS, TCPADDR_IP_POS, TCPADDR_PORT_POS, ITAB_TCPCONN, ITAB_TLSCONN, ITAB_PCONNWRITER
 * (0: unknown, not checked), SKMSG (0/1), PROBE_WRITE (0/1, and the constants listed in
 * traceparent_probe_write.h), PIN_DIR, MAX_INFLIGHT, RINGBUF_PAGES, WAKEUP_EVERY,
 * CTX_WALK_MAX.
 */
#include "go_types.h"
#include "record.h"
#include "ctx_spans.h"

#ifndef PROBE_WRITE
#define PROBE_WRITE 0
#endif
#if PROBE_WRITE && SKMSG
#error "PROBE_WRITE and SKMSG are two propagation modes: one at a time"
#endif

#define METHOD_MAX 16
#define SCHEME_MAX 8
#define HOST_MAX 128
#define PATH_MAX_ 128
#define QUERY_MAX 128

struct client_call {
    u64 start_ns;
    u64 req;            /* *http.Request */
    struct trace_ctx tc;
};

/* The request's Header map identifies it across roundTrip's clones and the writeLoop goroutine. */
struct hdr_key {
    u64 hdr;
    u32 tgid;
    u32 pad;
};

struct client_conn {
    struct trace_ctx tc;
    u8 write_seen;      /* (*Request).write ran for this request */
    u8 laddr_len;
    u8 raddr_len;
    u8 pw_outcome;      /* PROBE_WRITE: PW_* of the writer (traceparent_line.h); 0: it did not run */
    u16 lport;
    u16 rport;
    u8 laddr[16];
    u8 raddr[16];
};

/* The ring-buffer record, as declared in probes/nethttp_client RECORD (checked by RECORD_ASSERTS). */
struct http_client_event {
    struct event_header h;   /*   0 */
    struct trace_ctx tc;     /*  32 */
    u64 status;              /*  72 */
    u64 err_itab;            /*  80: 0 = no error */
    u16 method_len;          /*  88 */
    u16 scheme_len;
    u16 host_len;
    u16 path_len;
    u16 query_len;           /*  96 */
    u16 lport;
    u16 rport;
    u8 proto_major;          /* 102 */
    u8 proto_minor;
    u8 user;                 /* 104: 0 none, 1 user, 2 user and password */
    u8 prop_outcome;         /* skmsg_traceparent.c OUTCOME_*, 0: the sk_msg never saw it */
    u8 same_thread;
    u8 write_seen;
    u8 laddr_len;            /* 108 */
    u8 raddr_len;
    u8 pad[2];
    u8 laddr[16];            /* 112 */
    u8 raddr[16];            /* 128 */
    char method[METHOD_MAX]; /* 144 */
    char scheme[SCHEME_MAX]; /* 160 */
    char host[HOST_MAX];     /* 168 */
    char path[PATH_MAX_];    /* 296 */
    char query[QUERY_MAX];   /* 424, size 552 */
};
RECORD_ASSERTS;

/* client_inflight: goroutine_key -> client_call; roundTrip entry to RET. LRU: panics never return. */
BPF_TABLE("lru_hash", struct goroutine_key, struct client_call, client_inflight, MAX_INFLIGHT);
/* id_rng[0]: this CPU's span id generator state (new_span_ids, go_types.h). */
BPF_PERCPU_ARRAY(id_rng, u64, 1);
/* client_by_hdr: hdr_key -> client_conn; written at roundTrip entry, completed by the write
 * probe, read and deleted at roundTrip RET. */
BPF_TABLE("lru_hash", struct hdr_key, struct client_conn, client_by_hdr, MAX_INFLIGHT);
/* events, lost, submitted (record.h): finished client requests -> user space. */

#if SKMSG
#include "traceparent_handoff.h"
/* tp_pending: conn_key -> tp_pending; written by the write probe, consumed by the sk_msg program. */
BPF_TABLE_PINNED("lru_hash", struct conn_key, struct tp_pending, tp_pending, 16384, PIN_DIR "/tp_pending");
/* tp_result: span id -> tp_result; written by the sk_msg program, read and deleted at RET. */
BPF_TABLE_PINNED("lru_hash", u64, struct tp_result, tp_result, 16384, PIN_DIR "/tp_result");
#endif

#if PROBE_WRITE
#include "traceparent_probe_write.h"

struct pw_arm {
    u64 hdr;    /* the request's Header map */
    u64 bw;     /* the *bufio.Writer (Request.write's w data word) */
};

/* pw_armed: goroutine_key -> pw_arm; written at (*Request).write entry, consumed (deleted) by the
 * first writeSubset call of that goroutine for that Header. */
BPF_TABLE("lru_hash", struct goroutine_key, struct pw_arm, pw_armed, MAX_INFLIGHT);

static __always_inline void pw_arm_request(struct goroutine_key *k, u64 hdr, u64 bw) {
    struct pw_arm a = {.hdr = hdr, .bw = bw};
    pw_armed.update(k, &a);
}
#endif

/* ---- probes */

int uprobe_client_roundTrip(struct pt_regs *ctx) {
    struct goroutine_key k = goroutine_key(ctx);
    u64 req = GO_PARAM2(ctx);
    struct client_call *old = client_inflight.lookup(&k);
    if (old && old->req == req)
        return 0;                /* morestack re-ran the prologue: same call */
    struct client_call c = {};
    c.start_ns = bpf_ktime_get_ns();
    c.req = req;

    /* parent: walk the context chain up to a tracked server context (ctx_spans.h) */
    struct go_iface ictx = {};
    bpf_probe_read_user(&ictx, sizeof(ictx), (void *)(req + REQ_CTX_POS));
    struct ctx_key ck = {.tgid = k.tgid};
    u64 p = ictx.data;
    int keep = 0;
#if G_SPANS
    struct trace_ctx *gparent = g_spans.lookup(&k);   /* inside a function span */
    if (G_SPAN_IS_FUNCTION(gparent)) {
        __builtin_memcpy(c.tc.trace_id, gparent->trace_id, 16);
        __builtin_memcpy(c.tc.parent_span_id, gparent->span_id, 8);
        c.tc.flags = gparent->flags;
        keep = 1;
        p = 0;
    }
#endif
#pragma unroll
    for (int i = 0; i < CTX_WALK_MAX; i++) {
        if (p == 0)
            break;
        ck.ptr = p;
        struct trace_ctx *parent = ctx_spans.lookup(&ck);
        if (parent) {
            __builtin_memcpy(c.tc.trace_id, parent->trace_id, 16);
            __builtin_memcpy(c.tc.parent_span_id, parent->span_id, 8);
            c.tc.flags = parent->flags;
            keep = 1;
            break;
        }
        p = ctx_parent(p);
    }
    u32 zero = 0;
    new_span_ids(id_rng.lookup(&zero), &c.tc, keep);
    client_inflight.update(&k, &c);

    struct hdr_key hk = {.tgid = k.tgid};
    bpf_probe_read_user(&hk.hdr, sizeof(hk.hdr), (void *)(req + REQ_HEADER_POS));
    if (hk.hdr != 0) {
        struct client_conn cc = {};
        __builtin_memcpy(&cc.tc, &c.tc, sizeof(cc.tc));
        client_by_hdr.update(&hk, &cc);
    }
    return 0;
}

/* Read a *net.TCPAddr's IP (4 or 16 bytes) and port. */
static __always_inline void read_tcpaddr(u64 addr_iface_at, u8 *ip, u8 *ip_len, u16 *port) {
    struct go_iface a = {};
    if (bpf_probe_read_user(&a, sizeof(a), (void *)addr_iface_at) != 0 || a.data == 0)
        return;
    struct go_slice s = {};
    u64 pv = 0;
    bpf_probe_read_user(&s, sizeof(s), (void *)(a.data + TCPADDR_IP_POS));
    bpf_probe_read_user(&pv, sizeof(pv), (void *)(a.data + TCPADDR_PORT_POS));
    *port = pv;
    if (s.ptr != 0 && s.len == 16) {
        bpf_probe_read_user(ip, 16, (void *)s.ptr);
        *ip_len = 16;
    } else if (s.ptr != 0 && s.len == 4) {
        bpf_probe_read_user(ip, 4, (void *)s.ptr);
        *ip_len = 4;
    }
}

int uprobe_client_Request_write(struct pt_regs *ctx) {
    u64 r = GO_PARAM1(ctx);
    u64 bw = GO_PARAM3(ctx);     /* w's data word: *bufio.Writer for the transport */
    struct hdr_key hk = {.tgid = bpf_get_current_pid_tgid() >> 32};
    bpf_probe_read_user(&hk.hdr, sizeof(hk.hdr), (void *)(r + REQ_HEADER_POS));
    struct client_conn *cc = client_by_hdr.lookup(&hk);
    if (!cc)
        return 0;                /* not a request of a tracked roundTrip */
    cc->write_seen = 1;
#if PROBE_WRITE
    struct goroutine_key gk = goroutine_key(ctx);
    pw_arm_request(&gk, hk.hdr, bw);
#endif

    /* bw.wr = persistConnWriter{pc} (an interface holding the pointer-shaped struct directly) */
    struct go_iface wr = {};
    bpf_probe_read_user(&wr, sizeof(wr), (void *)(bw + BUFIO_WR_POS));
    if (wr.data == 0 || (ITAB_PCONNWRITER != 0 && wr.tab != ITAB_PCONNWRITER))
        return 0;
    struct go_iface conn = {};
    bpf_probe_read_user(&conn, sizeof(conn), (void *)(wr.data + PCONN_CONN_POS));
    if (ITAB_TLSCONN != 0 && conn.tab == ITAB_TLSCONN) {
        u64 tlsc = conn.data;    /* *tls.Conn: its conn field (net.Conn) is the TCP connection */
        bpf_probe_read_user(&conn, sizeof(conn), (void *)(tlsc + TLSCONN_CONN_POS));
    } else if (ITAB_TCPCONN != 0 && conn.tab != ITAB_TCPCONN) {
        /* A wrapper (metrics, recording, rate limiting...) usually embeds the net.Conn it wraps
         * as its first field: look one level down, and go on only if that is a *net.TCPConn.
         * Anything else (unix socket, a test double...) is left alone. */
        struct go_iface inner = {};
        bpf_probe_read_user(&inner, sizeof(inner), (void *)conn.data);
        if (inner.tab != ITAB_TCPCONN)
            return 0;
        conn = inner;
    }
    if (conn.data == 0)
        return 0;
    u64 fd = 0;                  /* *net.TCPConn -> conn.fd (*netFD) */
    bpf_probe_read_user(&fd, sizeof(fd), (void *)(conn.data + CONN_FD_POS));
    if (fd == 0)
        return 0;
    read_tcpaddr(fd + NETFD_LADDR_POS, cc->laddr, &cc->laddr_len, &cc->lport);
    read_tcpaddr(fd + NETFD_RADDR_POS, cc->raddr, &cc->raddr_len, &cc->rport);

#if SKMSG
    if (cc->lport == 0 || cc->rport == 0)
        return 0;
    struct conn_key k = {.tgid = hk.tgid, .lport = cc->lport, .rport = cc->rport};
    struct tp_pending p = {};
    __builtin_memcpy(p.trace_id, cc->tc.trace_id, 16);
    __builtin_memcpy(p.span_id, cc->tc.span_id, 8);
    p.flags = cc->tc.flags;
    struct go_string m = {};
    bpf_probe_read_user(&m, sizeof(m), (void *)(r + REQ_METHOD_POS));
    if (m.len == 0) {            /* "" means GET */
        __builtin_memcpy(p.method, "GET", 3);
        p.method_len = 3;
    } else if (m.len > 0 && m.len <= 7 && m.ptr != 0) {
        bpf_probe_read_user(p.method, m.len & 7, (void *)m.ptr);
        p.method_len = m.len;
    } else {
        return 0;                /* a method sk_msg would not check: do not insert */
    }
    p.ktime = bpf_ktime_get_ns();
    p.tid = bpf_get_current_pid_tgid();
    tp_pending.update(&k, &p);
#endif
    return 0;
}

#if PROBE_WRITE
int uprobe_client_writeSubset(struct pt_regs *ctx) {
    struct goroutine_key k = goroutine_key(ctx);
    struct pw_arm *a = pw_armed.lookup(&k);
    if (!a)
        return 0;                                  /* not a tracked request's write on this goroutine */
    u64 h = GO_PARAM1(ctx);
    u64 wtab = GO_PARAM2(ctx), bw = GO_PARAM3(ctx);
    if (h != a->hdr || bw != a->bw)
        return 0;                                  /* another Header (extraHeaders...) or writer */
    pw_armed.delete(&k);                           /* one shot: a morestack re-entry writes nothing */
    struct hdr_key hk = {.hdr = h, .tgid = k.tgid};
    struct client_conn *cc = client_by_hdr.lookup(&hk);
    if (!cc)
        return 0;
    if (ITAB_BUFIOWRITER != 0 && wtab != ITAB_BUFIOWRITER) {
        cc->pw_outcome = PW_WRITER_STATE;
        return 0;
    }
    int why = pw_check_header(h);
    if (why != 0) {
        cc->pw_outcome = why;
        return 0;
    }
    struct go_iface err = {};
    struct go_slice buf = {};
    s64 n = 0;
    if (bpf_probe_read_user(&err, sizeof(err), (void *)(bw + BUFIO_ERR_POS)) != 0 ||
        bpf_probe_read_user(&buf, sizeof(buf), (void *)(bw + BUFIO_BUF_POS)) != 0 ||
        bpf_probe_read_user(&n, sizeof(n), (void *)(bw + BUFIO_N_POS)) != 0) {
        cc->pw_outcome = PW_WRITER_STATE;
        return 0;
    }
    why = pw_room(buf.ptr, buf.len, buf.cap, n, err.tab);
    if (why != 0) {
        cc->pw_outcome = why;
        return 0;
    }
    char line[TP_LINE_LEN];
    tp_format_line(&cc->tc, line);
    if (PW_WRITE_USER(buf.ptr + n, line, TP_LINE_LEN) != 0) {
        cc->pw_outcome = PW_WRITE_FAILED;
        return 0;
    }
    s64 n2 = n + TP_LINE_LEN;
    if (PW_WRITE_USER(bw + BUFIO_N_POS, &n2, sizeof(n2)) != 0) {
        cc->pw_outcome = PW_WRITE_FAILED;          /* the line lies past n: never sent */
        return 0;
    }
    cc->pw_outcome = PW_INJECTED;
    return 0;
}
#endif

int uprobe_client_roundTrip_return(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    struct client_call *c = client_inflight.lookup(&k);
    if (!c)
        return 0;
    u64 resp = GO_PARAM1(ctx);
    u64 err_tab = GO_PARAM2(ctx);
    int sampled = SAMPLED(&c->tc);
    struct http_client_event *e = sampled ? events.ringbuf_reserve(sizeof(struct http_client_event)) : NULL;
    if (!e) {
        u32 z = 0;
        count_lost(sampled ? lost.lookup(&z) : unsampled.lookup(&z));
        client_inflight.delete(&k);
        return 0;
    }
    u64 req = c->req;
    e->h.kind = EVENT_KIND_HTTP_CLIENT;
    e->h.tgid = k.tgid;
    e->h.start_ns = c->start_ns;
    e->h.end_ns = now;
    e->h.goroutine = k.g;
    __builtin_memcpy(&e->tc, &c->tc, sizeof(e->tc));
    e->err_itab = err_tab;
    e->status = 0;
    e->proto_major = 0;
    e->proto_minor = 0;
    if (resp != 0) {
        u64 major = 0, minor = 0;
        bpf_probe_read_user(&e->status, sizeof(e->status), (void *)(resp + RESP_STATUS_POS));
        bpf_probe_read_user(&major, sizeof(major), (void *)(resp + RESP_PROTO_MAJOR_POS));
        bpf_probe_read_user(&minor, sizeof(minor), (void *)(resp + RESP_PROTO_MINOR_POS));
        e->proto_major = major;
        e->proto_minor = minor;
    }

    u32 n = 0;
    READ_GO_STRING(e->method, METHOD_MAX, req + REQ_METHOD_POS, n);
    e->method_len = n;
    u64 url = 0;
    bpf_probe_read_user(&url, sizeof(url), (void *)(req + REQ_URL_POS));
    e->scheme_len = e->host_len = e->path_len = e->query_len = 0;
    e->user = 0;
    if (url != 0) {
        n = 0;
        READ_GO_STRING(e->scheme, SCHEME_MAX, url + URL_SCHEME_POS, n);
        e->scheme_len = n;
        n = 0;
        READ_GO_STRING(e->host, HOST_MAX, url + URL_HOST_POS, n);
        e->host_len = n;
        n = 0;
        READ_GO_STRING(e->path, PATH_MAX_, url + URL_PATH_POS, n);
        e->path_len = n;
        n = 0;
        READ_GO_STRING(e->query, QUERY_MAX, url + URL_RAWQUERY_POS, n);
        e->query_len = n;
        u64 user = 0;
        bpf_probe_read_user(&user, sizeof(user), (void *)(url + URL_USER_POS));
        if (user != 0) {
            u8 pw = 0;
            bpf_probe_read_user(&pw, 1, (void *)(user + USERINFO_PASSWORDSET_POS));
            e->user = pw ? 2 : 1;
        }
    }

    struct hdr_key hk = {.tgid = k.tgid};
    bpf_probe_read_user(&hk.hdr, sizeof(hk.hdr), (void *)(req + REQ_HEADER_POS));
    struct client_conn *cc = client_by_hdr.lookup(&hk);
    e->write_seen = 0;
    e->lport = e->rport = 0;
    e->laddr_len = e->raddr_len = 0;
    u8 pw_outcome = 0;
    if (cc) {
        pw_outcome = cc->pw_outcome;
        e->write_seen = cc->write_seen;
        e->lport = cc->lport;
        e->rport = cc->rport;
        e->laddr_len = cc->laddr_len;
        e->raddr_len = cc->raddr_len;
        __builtin_memcpy(e->laddr, cc->laddr, 16);
        __builtin_memcpy(e->raddr, cc->raddr, 16);
        client_by_hdr.delete(&hk);
    }
    e->prop_outcome = pw_outcome;   /* 0 unless PROBE_WRITE */
    e->same_thread = 0;
#if SKMSG
    u64 sid = 0;
    __builtin_memcpy(&sid, c->tc.span_id, 8);
    struct tp_result *res = tp_result.lookup(&sid);
    if (res) {
        e->prop_outcome = res->outcome;
        e->same_thread = res->same_thread;
        tp_result.delete(&sid);
    }
#endif

    u32 z = 0;
    events.ringbuf_submit(e, wakeup_flags(submitted.lookup(&z)));
    client_inflight.delete(&k);
    return 0;
}
