/* nethttp_server.c: one SERVER span per net/http request.
 *
 * Hooks `net/http.serverHandler.ServeHTTP(sh, rw ResponseWriter, req *Request)`:
 *   entry (the jcc after the stack check, registers still hold the arguments): remember the call
 *     by goroutine, choose trace/span ids (parent from an incoming `traceparent` header);
 *   end: read the request fields and the response status, emit one record. Where the binary
 *     allows it (probes/nethttp_server.py `end_plan`), at points the kernel emulates:
 *     - HTTP/1.x: uprobe_server_end_h1 at the first emulated instruction after the call of
 *       ServeHTTP in `(*conn).serve` (the direct `call (*conn).hijacked`, run after every normal
 *       return, hijacked or not);
 *     - HTTP/2: uprobe_server_end_h2 at the entry (jcc) of the h2 server's
 *       `(*responseWriter).handlerDone(rw)`, run by the handler goroutine once the handler
 *       returned without panicking; it ends the call only if rw is the call's ResponseWriter;
 *     otherwise at every RET of ServeHTTP (uprobe_server_ServeHTTP_return, single-stepped).
 * Arguments (amd64 regabi): word 1 = sh.srv, words 2-3 = rw (itab, data = *http.response for
 * HTTP/1.x, the h2 server's *responseWriter for HTTP/2), word 4 = req.
 *
 * Compiled by BCC once per binary with that binary's layout as -D constants (loader.py):
 *   REQ_*_POS, URL_PATH_POS, RESP_STATUS_POS  struct field offsets
 *   H2_RWS_POS, H2_STATUS_POS  h2 responseWriter.rws and responseWriterState.status (-1: unknown)
 *   REQ_BLOCK_LEN  bytes of the Request that hold every field read at the end (0: read field by field)
 *   REQ_ENTRY_LEN  the same for the fields read at entry (Header, ctx)
 *   PATTERN_MODE  0 none, 1 req.pat->str (Go 1.22), 2 req.Pattern (Go >= 1.23)
 *   SWISS_MAPS    1 for Go >= 1.24 swiss maps, 0 for the classic hmap
 *   PIN_DIR       bpffs directory of the maps shared with the other probe programs
 *   CTX_SPANS     1: fill ctx_spans (the binary has a client or database/sql probe that reads it), 0: not
 *   ROUTE_PROBES  ROUTE_PROBE(framework, append, ptr word, len word) or ROUTE_PROBE_VIA(framework,
 *                 pointer word, offset, offset) for each web framework whose matched route template
 *                 is read (probes/routes): the span's route instead of the ServeMux pattern
 *   MAX_INFLIGHT, RINGBUF_PAGES, WAKEUP_EVERY
 * Benchmarks that measure pieces of this program compile their variants from the source as of a
 * revision that still had switches for them (benchmarks/server_probe_ab.py --ab-rev): this file
 * carries no benchmark switch.
 */
#include "go_types.h"
#include "record.h"
#include "ctx_spans.h"
#include "traceparent.h"

#define METHOD_MAX 16
#define PATH_MAX_ 128
#define REMOTE_MAX 64
#define HOST_MAX 128
#define PATTERN_MAX 128
#define UA_MAX 128
#define TP_MAX 64      /* traceparent value: 55 bytes for version 00 */
#define ROUTE_PARTS 4  /* route parts a framework that routes level by level (chi) may add */

/* Bounds of the header-map walk (the Header of a server request is map[string][]string). */
#ifndef MAX_VISITS
#define MAX_VISITS 12
#endif
     /* classic: 2^B buckets (B <= 3: up to 52 headers) + the old ones while growing */
#define MAX_TABLES 4       /* swiss: directory entries */
#define MAX_GROUPS 8       /* swiss: groups per table */

/* What the header walk found (kept in map memory: the verifier then does not track it). */
struct header_scan {
    u8 tp_found;
    u8 ua_found;
    u16 tp_len;
    u16 ua_len;
    char tp[TP_MAX];
    u64 overflow;            /* classic: the first overflow bucket seen, walked after the array */
};

/* Per-call state, between entry and return. */
struct server_call {
    u64 start_ns;
    u64 req;                 /* *http.Request */
    u64 resp;                /* *http.response (rw's data word) */
    u64 ctx_data;            /* req.ctx data word: the key in ctx_spans */
    struct trace_ctx tc;
    struct go_string route[ROUTE_PARTS]; /* a framework's matched route template (ROUTE_PROBES), in parts */
    u8 route_parts;          /* how many of `route` are set; 0: none, the ServeMux pattern is read */
    u8 route_join;           /* 1: the parts are chi's levels, joined by chi's rule (probes/routes) */
    u16 ua_len;
    u8 pad[4];
    char user_agent[UA_MAX];
    struct header_scan hs;
};

/* The ring-buffer record, as declared in probes/nethttp_server RECORD (checked by RECORD_ASSERTS). */
struct http_server_event {
    struct event_header h;   /*   0 */
    struct trace_ctx tc;     /*  32 */
    u64 status;              /*  72 */
    u8 method_len;           /*  80 */
    u8 method_off;           /* the method is at method[method_off]: 16 - its distance to the path
                                when both came in one read from the request line, else 0 */
    u16 path_len;
    u16 remote_len;
    u16 host_len;
    u16 pattern_len;
    u16 ua_len;
    u8 proto_major;          /*  92 */
    u8 proto_minor;
    u8 tls;
    u8 route_join;           /* the pattern is chi's route parts joined (server_call.route_join) */
    char method[METHOD_MAX]; /*  96 */
    char path[PATH_MAX_];    /* 112 */
    char remote[REMOTE_MAX]; /* 240 */
    char host[HOST_MAX];     /* 304 */
    char pattern[PATTERN_MAX]; /* 432 */
    char user_agent[UA_MAX]; /* 560, size 688 */
};
RECORD_ASSERTS;

/* inflight: goroutine_key -> server_call; written at entry, read and deleted at the end (RET or
 * end point). LRU: a handler that panics never reaches the end, its entry ages out. */
BPF_TABLE("lru_hash", struct goroutine_key, struct server_call, inflight, MAX_INFLIGHT);
/* ctx_spans (ctx_spans.h): written here at ServeHTTP entry with the request context's data word,
 * deleted at the end; read by the client and database/sql probes. */
/* walk_buf: one map group or bucket per CPU, read from the process in one go (a user-memory read
 * per slot costs more than one read of the whole group). */
struct walk_buf {
    u8 b[8 + 8 * 16 + 8 * 24 + 8];   /* the larger of a classic bucket (336) and a swiss group (328) */
};
BPF_PERCPU_ARRAY(walk_buf, struct walk_buf, 1);
/* id_rng[0]: this CPU's span id generator state (new_span_ids, go_types.h). */
BPF_PERCPU_ARRAY(id_rng, u64, 1);
/* req_block: the first REQ_BLOCK_LEN bytes of the *http.Request, per CPU, read in one go at the end
 * (one user-memory read instead of one per field: each costs ~0.1 us on the test VMs). */
#if !defined(REQ_BLOCK_LEN)
#undef REQ_BLOCK_LEN
#define REQ_BLOCK_LEN 0
#endif
#define REQ_BLOCK_MAX 512
struct req_block {
    u8 b[REQ_BLOCK_MAX];
};
BPF_PERCPU_ARRAY(req_block, struct req_block, 1);
#define REQ_U64(rb, pos) (*(u64 *)((rb)->b + (pos)))
#define REQ_STR(rb, pos) (*(struct go_string *)((rb)->b + (pos)))
/* scratch: one server_call per CPU, built there because it does not fit the 512-byte stack. */
BPF_PERCPU_ARRAY(scratch, struct server_call, 1);
/* events, lost, submitted (record.h): finished requests (struct http_server_event) -> user space. */

#ifndef CTX_SPANS
#define CTX_SPANS 1
#endif

/* ---- incoming headers: find "Traceparent" and "User-Agent" (canonical keys). */


/* Keys compared as integers (little-endian words): byte-by-byte compares compile to per-byte flags
 * whose combinations the verifier explores one by one. k holds 16 bytes, the key and zeros. */
#define KEY_TRACEPARENT_LO 0x7261706563617254ULL   /* "Tracepar" */
#define KEY_TRACEPARENT_HI 0x746e65ULL              /* "ent" */
#define KEY_USER_AGENT_LO 0x6567412d72657355ULL    /* "User-Age" */
#define KEY_USER_AGENT_HI 0x746eULL                 /* "nt" */

/* One map slot whose key header and value ([]string header) were read with its group/bucket:
 * `key`, and the value at `elem` in that copy. */
static __always_inline void scan_slot(struct go_string key, const u8 *elem, struct server_call *c) {
    if (key.len != 11 && key.len != 10)
        return;
    u64 k[2] = {};
    if (bpf_probe_read_user(k, key.len == 11 ? 11 : 10, (void *)key.ptr) != 0)
        return;
    int is_tp = key.len == 11 && k[0] == KEY_TRACEPARENT_LO && k[1] == KEY_TRACEPARENT_HI;
    int is_ua = key.len == 10 && k[0] == KEY_USER_AGENT_LO && k[1] == KEY_USER_AGENT_HI;
    if (!is_tp && !is_ua)
        return;
    struct go_slice vals = *(const struct go_slice *)elem;
    if (vals.len < 1 || vals.ptr == 0)
        return;
    if (is_tp && !c->hs.tp_found) {
        u32 n = 0;
        READ_GO_STRING(c->hs.tp, TP_MAX, vals.ptr, n);
        c->hs.tp_len = n;
        c->hs.tp_found = 1;
    } else if (is_ua && !c->hs.ua_found) {
        u32 n = 0;
        READ_GO_STRING(c->user_agent, UA_MAX, vals.ptr, n);
        c->ua_len = n;
        c->hs.ua_found = 1;
    }
}

/* The first bytes of a map header hold every field read (swiss: used 0, dirPtr 16, dirLen 24;
 * classic: count 0, B 9, buckets 16, oldbuckets 24; both headers are 48 bytes). */
#ifndef MAP_COUNT_POS
#define MAP_COUNT_POS 0
#endif
#define MAP_HEAD_LEN 32

#if SWISS_MAPS
/* Swiss map group: ctrl word, then 8 slots of {key string (16), elem []string (24)}. */
static __always_inline void scan_group(u64 group, struct server_call *c) {
    u32 z = 0;
    struct walk_buf *wb = walk_buf.lookup(&z);
    if (!wb || read_user_block(wb->b, 8 + 8 * 40, group) != 0)
        return;
    u64 ctrl = *(u64 *)wb->b;
    for (int i = 0; i < 8; i++) {
        if ((ctrl >> (8 * i)) & 0x80)   /* empty or deleted */
            continue;
        struct go_string key = *(struct go_string *)(wb->b + 8 + i * 40);
        scan_slot(key, wb->b + 8 + i * 40 + 16, c);
        if (c->hs.tp_found && c->hs.ua_found)
            return;
    }
}

static __always_inline void scan_headers(u64 m, struct server_call *c) {
    u64 mh[MAP_HEAD_LEN / 8] = {};   /* the map header, in one read */
    bpf_probe_read_user(mh, MAP_HEAD_LEN, (void *)m);
    if (mh[MAP_COUNT_POS / 8] == 0)  /* no headers but Host (which net/http keeps out of the map) */
        return;
    u64 dir_ptr = mh[SWISS_DIRPTR_POS / 8];
    s64 dir_len = mh[SWISS_DIRLEN_POS / 8];
    if (dir_ptr == 0)
        return;
    if (dir_len == 0) {          /* small map: dirPtr is the one group */
        scan_group(dir_ptr, c);
        return;
    }
    u64 prev = 0;
    for (int t = 0; t < MAX_TABLES; t++) {
        if (t >= dir_len)
            break;
        u64 table = 0;
        if (bpf_probe_read_user(&table, sizeof(table), (void *)(dir_ptr + t * 8)) != 0 || table == 0)
            break;
        if (table == prev)       /* directory entries may share a table */
            continue;
        prev = table;
        u64 groups = 0, mask = 0;
        bpf_probe_read_user(&groups, sizeof(groups), (void *)(table + SWISS_TABLE_GROUPS_POS));
        bpf_probe_read_user(&mask, sizeof(mask), (void *)(table + SWISS_TABLE_MASK_POS));
        for (int g = 0; g < MAX_GROUPS; g++) {
            if (g > mask || groups == 0)
                break;
            scan_group(groups + g * (8 + 8 * 40), c);
            if (c->hs.tp_found && c->hs.ua_found)
                return;
        }
    }
}
#else
/* Classic bucket: tophash[8], keys[8] (string), elems[8] ([]string), overflow pointer. */
#define BUCKET_SIZE (8 + 8 * 16 + 8 * 24 + 8)
static __always_inline void scan_bucket(u64 b, struct server_call *c) {
    u32 z = 0;
    struct walk_buf *wb = walk_buf.lookup(&z);
    if (!wb || read_user_block(wb->b, BUCKET_SIZE, b) != 0)
        return;
    u64 ovf = *(u64 *)(wb->b + BUCKET_SIZE - 8);
    if (c->hs.overflow == 0)     /* map memory: both paths leave the verifier the same state */
        c->hs.overflow = ovf;
    for (int i = 0; i < 8; i++) {
        if (wb->b[i] < 5)        /* tophash: empty or evacuated */
            continue;
        struct go_string key = *(struct go_string *)(wb->b + 8 + i * 16);
        scan_slot(key, wb->b + 8 + 8 * 16 + i * 24, c);
        if (c->hs.tp_found && c->hs.ua_found)
            return;
    }
}

static __always_inline void scan_headers(u64 m, struct server_call *c) {
    u64 mh[MAP_HEAD_LEN / 8] = {};   /* the map header, in one read */
    bpf_probe_read_user(mh, MAP_HEAD_LEN, (void *)m);
    if (mh[MAP_COUNT_POS / 8] == 0)  /* no headers but Host (which net/http keeps out of the map) */
        return;
    u8 B = ((u8 *)mh)[HMAP_B_POS];
    u64 buckets = mh[HMAP_BUCKETS_POS / 8], old = mh[HMAP_OLDBUCKETS_POS / 8];
    if (B > 3)
        B = 3;
    int nb = buckets ? 1 << B : 0;
    int nold = (old && B > 0) ? 1 << (B - 1) : 0;   /* growing: not yet evacuated */
    /* Bucket i of the array, then of oldbuckets, then the first overflow bucket seen. A bucket
     * overflows when more than 8 keys land in it: with 9 header lines (Host included, which net/http
     * deletes after) and a hint of 10, the 2 buckets get all 9 once in 256 processes (hash seed), and
     * the last line, often traceparent, went unseen. Further overflow buckets are not followed. */
    int total = nb + nold;
    for (int i = 0; i < MAX_VISITS; i++) {
        if (i >= total)
            break;
        u64 b = i < nb ? buckets + i * BUCKET_SIZE : old + (i - nb) * BUCKET_SIZE;
        scan_bucket(b, c);
        if (c->hs.tp_found && c->hs.ua_found)
            return;
    }
    u64 ovf = c->hs.overflow;
    if (ovf != 0)
        scan_bucket(ovf, c);
}
#endif

static __always_inline int parse_traceparent(struct header_scan *st, struct trace_ctx *tc) {
    if (!st->tp_found)
        return -1;
    return parse_traceparent_value(st->tp, st->tp_len, tc);
}

/* ---- probes */

int uprobe_server_ServeHTTP(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    u64 req = GO_PARAM4(ctx);
    struct server_call *old = inflight.lookup(&k);
    if (old && old->req == req)
        return 0;                /* morestack re-ran the prologue: same call */
    u32 z = 0;
    struct server_call *c = scratch.lookup(&z);
    if (!c)
        return 0;
    __builtin_memset(c, 0, sizeof(*c));
    c->start_ns = now;
    c->req = req;
    c->resp = GO_PARAM3(ctx);

    u64 hdr = 0;
    struct go_iface rctx = {};
#if REQ_ENTRY_LEN > 0 && REQ_ENTRY_LEN <= REQ_BLOCK_MAX
    {   /* Request.Header and Request.ctx in one read */
        struct req_block *rb = req_block.lookup(&z);
        if (!rb)
            return 0;
        if (read_user_block(rb->b, REQ_ENTRY_LEN, req) != 0)
            __builtin_memset(rb->b, 0, REQ_BLOCK_MAX);
        hdr = REQ_U64(rb, REQ_HEADER_POS);
        rctx = *(struct go_iface *)(rb->b + REQ_CTX_POS);
    }
#else
    bpf_probe_read_user(&hdr, sizeof(hdr), (void *)(req + REQ_HEADER_POS));
    bpf_probe_read_user(&rctx, sizeof(rctx), (void *)(req + REQ_CTX_POS));
#endif
    if (hdr != 0)
        scan_headers(hdr, c);
    int keep = 0;
    if (parse_traceparent(&c->hs, &c->tc) == 0) {
        keep = 1;
    } else {
        __builtin_memset(&c->tc, 0, sizeof(c->tc));
    }
    new_span_ids(id_rng.lookup(&z), &c->tc, keep);
#if CTX_SPANS
    c->ctx_data = rctx.data;
#endif
    inflight.update(&k, c);
    if (c->ctx_data != 0) {
        struct ctx_key ck = {.ptr = rctx.data, .tgid = k.tgid};
        ctx_spans.update(&ck, &c->tc);
    }
#if G_SPANS
    struct trace_ctx gtc = c->tc;   /* function spans on this goroutine are its children */
    gtc.server_goroutine = 1;
    g_spans.update(&k, &gtc);
#endif
    return 0;
}

/* Method and URL.Path into the record. An HTTP/1.x request's Method and (unescaped) Path are both
 * substrings of its request line, "GET /path?q HTTP/1.1": then one read from the method's first byte to
 * the path's last, placed so that the path lands at e->path (and the method `gap` bytes before it,
 * at method[16 - gap]). Otherwise (HTTP/2, an escaped path, a method longer than 15 bytes) two reads. */
static __always_inline void read_method_path(struct http_server_event *e, struct go_string m, u64 url) {
    struct go_string p = {};
    u32 n = 0;
    if (url != 0)
        bpf_probe_read_user(&p, sizeof(p), (void *)(url + URL_PATH_POS));
    e->method_off = 0;
    e->method_len = 0;
    e->path_len = 0;
    if (p.len > PATH_MAX_)
        p.len = PATH_MAX_;
    u64 gap = p.ptr - m.ptr;   /* the path's distance from the method's first byte */
    if (m.ptr != 0 && p.ptr > m.ptr && m.len > 0 && p.len > 0 && gap >= (u64)m.len && gap < METHOD_MAX) {
        u64 len = gap + p.len;
        u64 off = METHOD_MAX - gap;
        if (off >= 1 && off <= METHOD_MAX && len <= METHOD_MAX + PATH_MAX_ &&
            bpf_probe_read_user(e->method + off, len, (void *)m.ptr) == 0) {
            e->method_off = off;
            e->method_len = m.len;
            e->path_len = p.len;
            return;
        }
    }
    READ_GO_STRING_DATA(e->method, METHOD_MAX, m, n);
    e->method_len = n;
    READ_GO_STRING_DATA(e->path, PATH_MAX_, p, n);
    e->path_len = n;
}

/* The call `c` of goroutine `k` has ended at `now`: emit its record and forget it. */
static __always_inline int finish_call(struct goroutine_key *kp, struct server_call *c, u64 now) {
    struct goroutine_key k = *kp;
    int sampled = SAMPLED(&c->tc);
    struct http_server_event *e = sampled ? events.ringbuf_reserve(sizeof(struct http_server_event)) : NULL;
    if (!e) {
        u32 z = 0;
        count_lost(sampled ? lost.lookup(&z) : unsampled.lookup(&z));
        if (c->ctx_data != 0) {  /* many unsampled requests must not crowd out the live entries */
            struct ctx_key ck = {.ptr = c->ctx_data, .tgid = k.tgid};
            ctx_spans.delete(&ck);
        }
#if G_SPANS
        g_spans.delete(&k);
#endif
        inflight.delete(&k);
        return 0;
    }
    u64 req = c->req;
    e->h.kind = EVENT_KIND_HTTP_SERVER;
    e->h.tgid = k.tgid;
    e->h.start_ns = c->start_ns;
    e->h.end_ns = now;
    e->h.goroutine = k.g;
    __builtin_memcpy(&e->tc, &c->tc, sizeof(e->tc));
    u32 n = 0;
    e->ua_len = c->ua_len;
    if (c->ua_len)
        __builtin_memcpy(e->user_agent, c->user_agent, UA_MAX);

    e->status = 0;
#if REQ_BLOCK_LEN > 0 && REQ_BLOCK_LEN <= REQ_BLOCK_MAX
    u32 zb = 0;
    struct req_block *rb = req_block.lookup(&zb);
    if (!rb) {
        events.ringbuf_discard(e, BPF_RB_NO_WAKEUP);
#if G_SPANS
        g_spans.delete(&k);
#endif
        inflight.delete(&k);
        return 0;
    }
    if (read_user_block(rb->b, REQ_BLOCK_LEN, req) != 0)
        __builtin_memset(rb->b, 0, REQ_BLOCK_MAX);
    u64 major = REQ_U64(rb, REQ_PROTO_MAJOR_POS), minor = REQ_U64(rb, REQ_PROTO_MINOR_POS);
    u64 tls = REQ_U64(rb, REQ_TLS_POS);
#else
    u64 major = 0, minor = 0, tls = 0;
    bpf_probe_read_user(&major, sizeof(major), (void *)(req + REQ_PROTO_MAJOR_POS));
    bpf_probe_read_user(&minor, sizeof(minor), (void *)(req + REQ_PROTO_MINOR_POS));
    bpf_probe_read_user(&tls, sizeof(tls), (void *)(req + REQ_TLS_POS));
#endif
    e->proto_major = major;
    e->proto_minor = minor;
    e->tls = tls != 0;
    e->route_join = 0;
    if (major == 1) {            /* rw is *http.response only for HTTP/1.x */
        bpf_probe_read_user(&e->status, sizeof(e->status), (void *)(c->resp + RESP_STATUS_POS));
    }
#if H2_RWS_POS >= 0 && H2_STATUS_POS >= 0
    else if (major == 2) {       /* rw is the h2 server's *responseWriter: rws.status */
        u64 rws = 0;
        bpf_probe_read_user(&rws, sizeof(rws), (void *)(c->resp + H2_RWS_POS));
        if (rws != 0)
            bpf_probe_read_user(&e->status, sizeof(e->status), (void *)(rws + H2_STATUS_POS));
        if (e->status == 0)
            e->status = 200;     /* nothing written: handlerDone's Flush sends 200 */
    }
#endif

#if REQ_BLOCK_LEN > 0 && REQ_BLOCK_LEN <= REQ_BLOCK_MAX
    read_method_path(e, REQ_STR(rb, REQ_METHOD_POS), REQ_U64(rb, REQ_URL_POS));
    READ_GO_STRING_DATA(e->remote, REMOTE_MAX, REQ_STR(rb, REQ_REMOTEADDR_POS), n);
    e->remote_len = n;
    READ_GO_STRING_DATA(e->host, HOST_MAX, REQ_STR(rb, REQ_HOST_POS), n);
    e->host_len = n;
    n = 0;
#if PATTERN_MODE == 2
    READ_GO_STRING_DATA(e->pattern, PATTERN_MAX, REQ_STR(rb, REQ_PATTERN_POS), n);
#elif PATTERN_MODE == 1
    u64 pat = REQ_U64(rb, REQ_PAT_POS);
    if (pat != 0)
        READ_GO_STRING(e->pattern, PATTERN_MAX, pat + PATTERN_STR_POS, n);
#endif
#else
    READ_GO_STRING(e->method, METHOD_MAX, req + REQ_METHOD_POS, n);
    e->method_len = n;
    e->method_off = 0;
    u64 url = 0;
    bpf_probe_read_user(&url, sizeof(url), (void *)(req + REQ_URL_POS));
    n = 0;
    if (url != 0)
        READ_GO_STRING(e->path, PATH_MAX_, url + URL_PATH_POS, n);
    e->path_len = n;
    READ_GO_STRING(e->remote, REMOTE_MAX, req + REQ_REMOTEADDR_POS, n);
    e->remote_len = n;
    READ_GO_STRING(e->host, HOST_MAX, req + REQ_HOST_POS, n);
    e->host_len = n;
    n = 0;
#if PATTERN_MODE == 2
    READ_GO_STRING(e->pattern, PATTERN_MAX, req + REQ_PATTERN_POS, n);
#elif PATTERN_MODE == 1
    u64 pat = 0;
    bpf_probe_read_user(&pat, sizeof(pat), (void *)(req + REQ_PAT_POS));
    if (pat != 0)
        READ_GO_STRING(e->pattern, PATTERN_MAX, pat + PATTERN_STR_POS, n);
#endif
#endif
#ifdef ROUTE_PROBES
    if (c->route_parts == 1) {   /* the framework routed: its template, not the ServeMux pattern */
        n = 0;
        READ_GO_STRING_DATA(e->pattern, PATTERN_MAX, c->route[0], n);
    } else if (c->route_parts > 1) {   /* chi's levels, one after the other (joined in user space) */
        n = 0;
        e->route_join = c->route_join;
#pragma unroll
        for (int i = 0; i < ROUTE_PARTS; i++) {
            if (i >= c->route_parts || n >= PATTERN_MAX - 1)
                break;
            u64 len = c->route[i].len;
            if (len > PATTERN_MAX - 1 - n)
                len = PATTERN_MAX - 1 - n;
            u64 off = n;
            /* masks the verifier sees (the empty asm keeps the compiler from dropping them as known):
             * an offset and a size below PATTERN_MAX each, inside pattern + user_agent (written after) */
            asm volatile("" : "+r"(len), "+r"(off));
            off &= PATTERN_MAX - 1;
            len &= PATTERN_MAX - 1;
            if (len > 0 && bpf_probe_read_user(e->pattern + off, len, (void *)c->route[i].ptr) == 0)
                n += len;
        }
    }
#endif
    e->pattern_len = n;

    u32 z = 0;
    events.ringbuf_submit(e, wakeup_flags(submitted.lookup(&z)));
    if (c->ctx_data != 0) {
        struct ctx_key ck = {.ptr = c->ctx_data, .tgid = k.tgid};
        ctx_spans.delete(&ck);
    }
#if G_SPANS
    g_spans.delete(&k);
#endif
    inflight.delete(&k);
    return 0;
}

/* The end of the call stored at entry for this goroutine; with `check_resp`, only if the first
 * argument is its ResponseWriter. */
static __always_inline int end_call(struct pt_regs *ctx, int check_resp) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    struct server_call *c = inflight.lookup(&k);
    if (!c || (check_resp && c->resp != GO_PARAM1(ctx)))
        return 0;
    return finish_call(&k, c, now);
}

/* Every RET of ServeHTTP (single-stepped: the fallback). */
int uprobe_server_ServeHTTP_return(struct pt_regs *ctx) {
    return end_call(ctx, 0);
}

/* HTTP/1.x end point in (*conn).serve, right after ServeHTTP returned on this goroutine. */
int uprobe_server_end_h1(struct pt_regs *ctx) {
    return end_call(ctx, 0);
}

/* HTTP/2 end point: entry of (*responseWriter).handlerDone(rw) on the handler goroutine; not the
 * ResponseWriter of the call on this goroutine: not ours. */
int uprobe_server_end_h2(struct pt_regs *ctx) {
    return end_call(ctx, 1);
}

#ifdef ROUTE_PROBES
/* A framework assigned its matched route template (probes/routes): keep its header in the server
 * call of this goroutine, whose end reads the bytes. Template strings live in the framework's route
 * tree for the program's life. `append`: one more level's part (chi), else the route is replaced. */
static __always_inline int take_route(struct pt_regs *ctx, u64 ptr, u64 len, int append) {
    struct goroutine_key k = goroutine_key(ctx);
    struct server_call *c = inflight.lookup(&k);
    if (!c)
        return 0;                /* not under a traced ServeHTTP (e.g. a test calling the engine) */
    u8 i = append ? c->route_parts : 0;
    if (i >= ROUTE_PARTS)
        return 0;                /* deeper than ROUTE_PARTS levels: the first ones are kept */
    c->route[i & (ROUTE_PARTS - 1)].ptr = ptr;
    c->route[i & (ROUTE_PARTS - 1)].len = len;
    c->route_parts = i + 1;
    c->route_join = append;
    return 0;
}

static __always_inline u64 route_word(u64 addr) {
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)addr);
    return v;
}

/* Where a word of the assigned field is at the probe point: a register (a pt_regs field), or memory
 * at a register + offset (the field, once stored). */
#define ROUTE_REG(reg) (ctx->reg)
#define ROUTE_MEM(reg, offset) route_word(ctx->reg + (offset))

/* uprobe_route_<framework>: the field is the template string. */
#define ROUTE_PROBE(framework, append, ptr_word, len_word) \
    int uprobe_route_##framework(struct pt_regs *ctx) { return take_route(ctx, ptr_word, len_word, append); }

/* uprobe_route_<framework>: the field points to a struct holding, at `to_ptr`, a pointer to the
 * struct whose string at `to_str` is the template (mux: *Route -> regexp.path -> template); a nil
 * step: no template (the route matched on something else than its path). */
#define ROUTE_PROBE_VIA(framework, ptr_word, to_ptr, to_str)                                       \
    int uprobe_route_##framework(struct pt_regs *ctx) {                                             \
        u64 p = ptr_word;                                                                           \
        if (p == 0 || (p = route_word(p + (to_ptr))) == 0)                                          \
            return 0;                                                                               \
        return take_route(ctx, route_word(p + (to_str)), route_word(p + (to_str) + 8), 0);          \
    }
ROUTE_PROBES
#endif
