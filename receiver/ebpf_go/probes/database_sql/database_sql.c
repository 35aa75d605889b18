/* database_sql.c: one CLIENT span per database/sql query or exec.
 *
 * Hooks (entry at the jcc after the stack check, plus every RET):
 *   database/sql.(*DB).queryDC(db, ctx, txctx, dc, releaseConn, query string, args)  -> (*Rows, error)
 *     ctx = words 2-3, query = words 8-9. Reached by DB.Query*, Tx.Query*, Conn.Query*.
 *   database/sql.(*DB).execDC(db, ctx, dc, release, query string, args)             -> (Result, error)
 *     ctx = words 2-3, query = words 6-7. Reached by DB.Exec*, Tx.Exec*, Conn.Exec*.
 *   database/sql.(*Stmt).QueryContext(s, ctx, args...)                               -> (*Rows, error)
 *   database/sql.(*Stmt).ExecContext(s, ctx, args...)                                -> (Result, error)
 *     ctx = words 2-3, query = s.query. Prepared statements skip queryDC/execDC.
 * At RET the error interface is (RBX, RCX) after *Rows and (RCX, RDI) after Result; its itab
 * (0 = nil) goes to user space, which names the type from the binary's itab symbols.
 *
 * Parent: the server span whose request context the call's ctx is or descends from (the pinned
 * `ctx_spans` map of ctx_spans.h, which nethttp_server.c fills); a call with no such context (context.Background(),
 * a context made outside any request) is a root span with a fresh trace id.
 *
 * -D constants from probes/database_sql PROBE:
 *   DB_CONNECTOR_POS, STMT_DB_POS, STMT_QUERY_POS  struct field offsets
 *   QUERY_MAX           bytes of query text copied (power of two)
 *   PIN_DIR, CTX_WALK_MAX, MAX_INFLIGHT, RINGBUF_PAGES, WAKEUP_EVERY
 */
#include "go_types.h"
#include "record.h"
#include "ctx_spans.h"

/* Which hooked function produced a record (database_sql.py FUNCTIONS has the same order). */
#define SQL_FN_QUERYDC 0
#define SQL_FN_EXECDC 1
#define SQL_FN_STMT_QUERY 2
#define SQL_FN_STMT_EXEC 3

/* Per-call state, between entry and return; also the body of the ring-buffer record. */
struct sql_call {
    u64 start_ns;
    struct trace_ctx tc;     /*   8 */
    u64 db;                  /*  48: *sql.DB */
    u64 connector_tab;       /*  56: itab of db.connector (driver.Connector) */
    u64 connector_data;      /*  64 */
    u64 pad0;                /*  72 */
    u64 query_ptr;           /*  80: the Go string's data pointer (re-entry check) */
    u32 query_len;           /*  88: full length of the statement */
    u16 captured;            /*  92: bytes in query[] */
    u8 fn;                   /*  94: SQL_FN_* */
    u8 parent_source;        /*  95: 1 when the parent came from the context chain */
    char query[QUERY_MAX];   /*  96 */
};

/* The ring-buffer record, as declared in probes/database_sql RECORD (checked by RECORD_ASSERTS); only
 * the captured part of the query text is sent. */
struct sql_event {
    struct event_header h;   /*   0 */
    u64 err_tab;             /*  32: itab of the returned error, 0 = nil */
    u64 err_data;            /*  40 */
    struct sql_call c;       /*  48 */
};
RECORD_ASSERTS;

/* sql_inflight: goroutine_key -> sql_call; written at entry, read and deleted at RET. LRU: a call
 * that panics never returns. */
BPF_TABLE("lru_hash", struct goroutine_key, struct sql_call, sql_inflight, MAX_INFLIGHT);
/* id_rng[0]: this CPU's span id generator state (new_span_ids, go_types.h). */
BPF_PERCPU_ARRAY(id_rng, u64, 1);
/* sql_scratch: one sql_call per CPU, built there because it does not fit the 512-byte stack. */
BPF_PERCPU_ARRAY(sql_scratch, struct sql_call, 1);
/* sql_out: one sql_event per CPU, assembled there and copied out with its text's length only. */
BPF_PERCPU_ARRAY(sql_out, struct sql_event, 1);
/* events, lost, submitted (record.h): finished calls (struct sql_event) -> user space. */

/* Walk the context chain from the call's ctx up to a tracked server context (ctx_spans.h). */
static __always_inline int parent_from_ctx(u64 p, u32 tgid, struct trace_ctx *out) {
    struct ctx_key ck = {.tgid = tgid};
    for (int i = 0; i < CTX_WALK_MAX; i++) {
        if (p == 0)
            return -1;
        ck.ptr = p;
        struct trace_ctx *parent = ctx_spans.lookup(&ck);
        if (parent) {
            __builtin_memcpy(out, parent, sizeof(*out));
            return 0;
        }
        p = ctx_parent(p);
    }
    return -1;
}

static __always_inline void sql_entry(struct pt_regs *ctx, u8 fn, u64 db, u64 ctx_data, u64 qptr, s64 qlen) {
    struct goroutine_key k = goroutine_key(ctx);
    struct sql_call *old = sql_inflight.lookup(&k);
    if (old && old->query_ptr == qptr && old->db == db && old->fn == fn)
        return;                  /* morestack re-ran the prologue: same call */
    u32 z = 0;
    struct sql_call *c = sql_scratch.lookup(&z);
    if (!c)
        return;
    /* every field but query[] is set below; query[] beyond `captured` is never read */
    c->start_ns = bpf_ktime_get_ns();
    c->connector_tab = 0;
    c->connector_data = 0;
    c->pad0 = 0;
    c->captured = 0;
    c->parent_source = 0;
    c->fn = fn;
    c->db = db;
    c->query_ptr = qptr;
    c->query_len = qlen < 0 ? 0 : (u32)qlen;
    u64 n = qlen < 0 ? 0 : (u64)qlen;
    if (n > QUERY_MAX)
        n = QUERY_MAX;
    if (qptr != 0 && n == QUERY_MAX) {
        if (bpf_probe_read_user(c->query, QUERY_MAX, (void *)qptr) == 0)
            c->captured = QUERY_MAX;
    } else if (qptr != 0 && n > 0) {
        n &= QUERY_MAX - 1;      /* n < QUERY_MAX: a bound the verifier can see */
        if (bpf_probe_read_user(c->query, n, (void *)qptr) == 0)
            c->captured = n;
    }
    struct go_iface conn = {};
    if (db != 0 && bpf_probe_read_user(&conn, sizeof(conn), (void *)(db + DB_CONNECTOR_POS)) == 0) {
        c->connector_tab = conn.tab;   /* user space names the driver from it, once per pool */
        c->connector_data = conn.data;
    }

#if G_SPANS
    int found = -1;
    struct trace_ctx *gparent = g_spans.lookup(&k);   /* inside a function span */
    if (G_SPAN_IS_FUNCTION(gparent)) {
        __builtin_memcpy(&c->tc, gparent, sizeof(c->tc));
        found = 0;
    } else {
        found = parent_from_ctx(ctx_data, k.tgid, &c->tc);
    }
#else
    int found = parent_from_ctx(ctx_data, k.tgid, &c->tc);
#endif
    c->parent_source = found == 0;
    u32 zero = 0;
    u64 *rng = id_rng.lookup(&zero);
    if (found == 0) {
        /* the parent's span id becomes ours as parent; keep its trace id and flags */
        __builtin_memcpy(c->tc.parent_span_id, c->tc.span_id, sizeof(c->tc.parent_span_id));
        c->tc.remote_parent = 0;
        new_span_ids(rng, &c->tc, 1);
    } else {
        __builtin_memset(&c->tc, 0, sizeof(c->tc));
        new_span_ids(rng, &c->tc, 0);
    }
    sql_inflight.update(&k, c);
}

static __always_inline void sql_return(struct pt_regs *ctx, u64 err_tab, u64 err_data) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    struct sql_call *c = sql_inflight.lookup(&k);
    if (!c)
        return;
    u32 z = 0;
    struct sql_event *e = sql_out.lookup(&z);
    if (!e || !SAMPLED(&c->tc)) {
        if (e)
            count_lost(unsampled.lookup(&z));
        sql_inflight.delete(&k);
        return;
    }
    e->h.kind = EVENT_KIND_DATABASE_SQL;
    e->h.tgid = k.tgid;
    e->h.start_ns = c->start_ns;
    e->h.end_ns = now;
    e->h.goroutine = k.g;
    e->err_tab = err_tab;
    e->err_data = err_data;
    bpf_probe_read_kernel(&e->c, sizeof(e->c), c);   /* too big for an inlined memcpy */
    /* send only the captured text: most statements are far shorter than QUERY_MAX */
    u64 size = sizeof(struct sql_event) - QUERY_MAX + (c->captured & (2 * QUERY_MAX - 1));
    if (size > sizeof(struct sql_event))
        size = sizeof(struct sql_event);
    if (events.ringbuf_output(e, size, wakeup_flags(submitted.lookup(&z))) != 0)
        count_lost(lost.lookup(&z));
    sql_inflight.delete(&k);
}

/* ---- probes */

int uprobe_sql_queryDC(struct pt_regs *ctx) {
    sql_entry(ctx, SQL_FN_QUERYDC, GO_PARAM1(ctx), GO_PARAM3(ctx), GO_PARAM8(ctx), (s64)GO_PARAM9(ctx));
    return 0;
}

int uprobe_sql_execDC(struct pt_regs *ctx) {
    sql_entry(ctx, SQL_FN_EXECDC, GO_PARAM1(ctx), GO_PARAM3(ctx), GO_PARAM6(ctx), (s64)GO_PARAM7(ctx));
    return 0;
}

static __always_inline void stmt_entry(struct pt_regs *ctx, u8 fn) {
    u64 s = GO_PARAM1(ctx);
    u64 db = 0;
    struct go_string q = {};
    if (s == 0)
        return;
    bpf_probe_read_user(&db, sizeof(db), (void *)(s + STMT_DB_POS));
    bpf_probe_read_user(&q, sizeof(q), (void *)(s + STMT_QUERY_POS));
    sql_entry(ctx, fn, db, GO_PARAM3(ctx), q.ptr, q.len);
}

int uprobe_sql_Stmt_QueryContext(struct pt_regs *ctx) {
    stmt_entry(ctx, SQL_FN_STMT_QUERY);
    return 0;
}

int uprobe_sql_Stmt_ExecContext(struct pt_regs *ctx) {
    stmt_entry(ctx, SQL_FN_STMT_EXEC);
    return 0;
}

/* (*Rows, error): the error is words 2-3. */
int uprobe_sql_return_rows(struct pt_regs *ctx) {
    sql_return(ctx, GO_PARAM2(ctx), GO_PARAM3(ctx));
    return 0;
}

/* (Result, error): Result is words 1-2, the error words 3-4. */
int uprobe_sql_return_result(struct pt_regs *ctx) {
    sql_return(ctx, GO_PARAM3(ctx), GO_PARAM4(ctx));
    return 0;
}
