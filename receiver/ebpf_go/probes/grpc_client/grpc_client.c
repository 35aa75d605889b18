/* grpc_client.c: one CLIENT span per gRPC call (unary or streaming) made by grpc-go.
 *
 * Hooks (each at the jcc after the stack check: emulated, ~0.6 us; no RET probe, none per message):
 *   grpc.newClientStream(ctx, desc, cc, method string, opts...)
 *     the call starts, on the caller's goroutine: ctx = words 1-2, cc = word 4, method = words 5-6.
 *     Unary calls (Invoke) and streams (NewStream) both go through it. The parent is the span
 *     running under ctx or one of its parents (ctx_spans); kept by goroutine in grpc_pending.
 *   grpc.(*clientStream).newAttemptLocked(cs, ...)
 *     the same goroutine, once the clientStream exists: the pending call moves to grpc_calls under
 *     cs (later attempts, on other goroutines, find nothing pending).
 *   grpc.(*clientStream).finish(cs, err error)
 *     the call ends, once per stream (unary: in RecvMsg; a stream: at its final status, or when its
 *     context ends): err = words 2-3. The status code and message are read through
 *     err -> *status.Error{s} -> *status.Status{s} -> genproto Status{Code, Message}; user space
 *     keeps them only when err's itab is *status.Error's (else the code is UNKNOWN, as
 *     status.Code(err) says; nil and io.EOF, which ends a stream normally: OK).
 * A call whose stream is never created (newClientStream failed before newAttemptLocked) leaves its
 * pending entry, replaced by the goroutine's next call; no span is made for it.
 *
 * At finish it also reads, for the stitcher, the last attempt's HTTP/2 stream id and its connection's
 * two ends: cs.attempt -> csAttempt.{t|transport} (*http2Client: localAddr, remoteAddr) and
 * csAttempt.{s|transportStream} -> the Stream (through ClientStream from grpc 1.69) -> id.
 *
 * -D constants from probes/grpc_client PROBE:
 *   CC_TARGET_POS         ClientConn.target (string)
 *   CS_ATTEMPT_POS, ATTEMPT_T_POS, ATTEMPT_S_POS, CLIENT_STREAM_MODE (0 *Stream, 1 ClientStream{*Stream},
 *   2 ClientStream{Stream}), CS_STREAM_POS, STREAM_ID_POS, H2C_REMOTEADDR_POS (remoteAddr, localAddr
 *   follows: resolved once per connection, conn_cache)
 *   TCPADDR_IP_POS, TCPADDR_PORT_POS, ITAB_TCPADDR  (netaddr.h)
 *   STATUS_ERROR_S_POS, STATUS_S_POS, SPB_CODE_POS, SPB_MESSAGE_POS  the status chain
 *   PIN_DIR, CTX_WALK_MAX, MAX_INFLIGHT, RINGBUF_PAGES, WAKEUP_EVERY
 */
#include "go_types.h"
#include "record.h"
#include "ctx_spans.h"
#include "netaddr.h"

#define METHOD_MAX 128
#define TARGET_MAX 128
#define MESSAGE_MAX 128

/* Per-call state, from newClientStream to finish. */
struct grpc_client_call {
    u64 start_ns;
    u64 ctx_data;            /* re-entry check */
    u64 cc;                  /* *ClientConn */
    u64 method_ptr;          /* re-entry check */
    struct trace_ctx tc;
    u16 method_len;
    u8 parent_from_ctx;
    u8 pad[5];
    char method[METHOD_MAX];
};

/* The ring-buffer record, as declared in probes/grpc_client RECORD (checked by RECORD_ASSERTS). */
struct grpc_client_event {
    struct event_header h;     /*   0 */
    struct trace_ctx tc;       /*  32 */
    u64 err_tab;               /*  72: itab of finish's error, 0 = nil */
    s32 code;                  /*  80: read through the status chain (meaningful for a status error) */
    u16 method_len;            /*  84 */
    u16 target_len;            /*  86 */
    u16 message_len;           /*  88 */
    u8 parent_from_ctx;        /*  90 */
    u8 eof;                    /*  91: err's data is a string header of "EOF" (io.EOF ends a stream: OK) */
    u32 stream_id;             /*  92: the HTTP/2 stream of the last attempt (0: none) */
    struct addr local;         /*  96: the connection's ends */
    struct addr peer;          /* 120 */
    char method[METHOD_MAX];   /* 144 */
    char target[TARGET_MAX];   /* 272 */
    char message[MESSAGE_MAX]; /* 400, size 528 */
};
RECORD_ASSERTS;

struct cs_key {
    u64 cs;
    u32 tgid;
    u32 pad;
};

/* grpc_pending: goroutine -> call, from newClientStream to newAttemptLocked (same goroutine). */
BPF_TABLE("lru_hash", struct goroutine_key, struct grpc_client_call, grpc_pending, MAX_INFLIGHT);
/* grpc_calls: clientStream -> call, from newAttemptLocked to finish (any goroutine). LRU: a stream
 * that is never finished (its process exits) ages out. */
BPF_TABLE("lru_hash", struct cs_key, struct grpc_client_call, grpc_calls, MAX_INFLIGHT);
BPF_PERCPU_ARRAY(call_scratch, struct grpc_client_call, 1);
BPF_PERCPU_ARRAY(event_out, struct grpc_client_event, 1);
BPF_PERCPU_ARRAY(id_rng, u64, 1);
/* conn_cache: {*http2Client, tgid} -> its two ends (netaddr.h: checked against the transport's fields) */
BPF_TABLE("lru_hash", struct conn_key, struct conn_addrs, conn_cache, MAX_INFLIGHT);
BPF_PERCPU_ARRAY(conn_scratch, struct conn_addrs, 1);
/* csAttempt from its transport interface to its stream pointer (ATTEMPT_T_POS < ATTEMPT_S_POS) */
struct attempt_block {
    u8 b[ATTEMPT_S_POS - ATTEMPT_T_POS + 8];
};

/* Walk the context chain from the call's ctx up to a context with a span (ctx_spans.h). */
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

int uprobe_grpc_newClientStream(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    u64 ctx_data = GO_PARAM2(ctx), cc = GO_PARAM4(ctx), mptr = GO_PARAM5(ctx);
    s64 mlen = (s64)GO_PARAM6(ctx);
    struct grpc_client_call *old = grpc_pending.lookup(&k);
    if (old && old->method_ptr == mptr && old->ctx_data == ctx_data && old->cc == cc)
        return 0;                /* morestack re-ran the prologue: same call */
    u32 z = 0;
    struct grpc_client_call *c = call_scratch.lookup(&z);
    if (!c)
        return 0;
    __builtin_memset(c, 0, sizeof(*c));
    c->start_ns = now;
    c->ctx_data = ctx_data;
    c->cc = cc;
    c->method_ptr = mptr;
    struct go_string m = {.ptr = mptr, .len = mlen};
    u64 n = 0;
    READ_GO_STRING_DATA(c->method, METHOD_MAX, m, n);
    c->method_len = n;
    u64 *rng = id_rng.lookup(&z);
    int found = -1;
#if G_SPANS
    struct trace_ctx *gparent = g_spans.lookup(&k);   /* inside a function span */
    if (G_SPAN_IS_FUNCTION(gparent)) {
        __builtin_memcpy(&c->tc, gparent, sizeof(c->tc));
        found = 0;
    }
#endif
    if (found != 0)
        found = parent_from_ctx(ctx_data, k.tgid, &c->tc);
    if (found == 0) {
        /* the parent's span id becomes ours as parent; keep its trace id and flags */
        __builtin_memcpy(c->tc.parent_span_id, c->tc.span_id, sizeof(c->tc.parent_span_id));
        c->tc.remote_parent = 0;
        c->parent_from_ctx = 1;
        new_span_ids(rng, &c->tc, 1);
    } else {
        __builtin_memset(&c->tc, 0, sizeof(c->tc));
        new_span_ids(rng, &c->tc, 0);
    }
    grpc_pending.update(&k, c);
    return 0;
}

int uprobe_grpc_newAttemptLocked(struct pt_regs *ctx) {
    struct goroutine_key k = goroutine_key(ctx);
    struct grpc_client_call *c = grpc_pending.lookup(&k);
    if (!c)
        return 0;                /* a retry's attempt, or a stream made before we attached */
    struct cs_key ck = {.cs = GO_PARAM1(ctx), .tgid = k.tgid};
    grpc_calls.update(&ck, c);
    grpc_pending.delete(&k);
    return 0;
}

int uprobe_grpc_finish(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct cs_key ck = {.cs = GO_PARAM1(ctx), .tgid = tgid};
    struct grpc_client_call *c = grpc_calls.lookup(&ck);
    if (!c)
        return 0;                /* not a call we saw start, or finished already */
    u32 z = 0;
    if (!SAMPLED(&c->tc)) {      /* no record: counted (before any copying) */
        grpc_calls.delete(&ck);
        count_lost(unsampled.lookup(&z));
        return 0;
    }
    struct grpc_client_event *e = event_out.lookup(&z);
    if (!e) {
        grpc_calls.delete(&ck);
        return 0;
    }
    e->h.kind = EVENT_KIND_GRPC_CLIENT;
    e->h.tgid = tgid;
    e->h.start_ns = c->start_ns;
    e->h.end_ns = now;
    e->h.goroutine = GOROUTINE(ctx);
    __builtin_memcpy(&e->tc, &c->tc, sizeof(e->tc));
    e->method_len = c->method_len;
    e->parent_from_ctx = c->parent_from_ctx;
    bpf_probe_read_kernel(e->method, METHOD_MAX, c->method);
    u64 cc = c->cc;
    grpc_calls.delete(&ck);

    e->err_tab = GO_PARAM2(ctx);
    e->code = 0;
    e->message_len = 0;
    e->eof = 0;
    u64 err = GO_PARAM3(ctx), st = 0, spb = 0;
    struct go_string text = {};
    char eof[4] = {};
    if (e->err_tab != 0 && err != 0 && bpf_probe_read_user(&text, sizeof(text), (void *)err) == 0 &&
        text.len == 3 && bpf_probe_read_user(eof, 3, (void *)text.ptr) == 0 &&
        eof[0] == 'E' && eof[1] == 'O' && eof[2] == 'F')
        e->eof = 1;             /* *errors.errorString{"EOF"}: io.EOF, whose pointer is not known statically */
    if (e->err_tab != 0 && err != 0 &&
        bpf_probe_read_user(&st, sizeof(st), (void *)(err + STATUS_ERROR_S_POS)) == 0 && st != 0 &&
        bpf_probe_read_user(&spb, sizeof(spb), (void *)(st + STATUS_S_POS)) == 0 && spb != 0) {
        struct go_string msg = {};
        bpf_probe_read_user(&e->code, sizeof(e->code), (void *)(spb + SPB_CODE_POS));
        if (bpf_probe_read_user(&msg, sizeof(msg), (void *)(spb + SPB_MESSAGE_POS)) == 0) {
            u64 ml = 0;
            READ_GO_STRING_DATA(e->message, MESSAGE_MAX, msg, ml);
            e->message_len = ml;
        }
    }
    e->stream_id = 0;
    __builtin_memset(&e->local, 0, sizeof(e->local));
    __builtin_memset(&e->peer, 0, sizeof(e->peer));
    u64 a = 0;
    if (bpf_probe_read_user(&a, sizeof(a), (void *)(GO_PARAM1(ctx) + CS_ATTEMPT_POS)) == 0 && a != 0) {
        struct attempt_block ab = {};   /* csAttempt's transport interface and stream pointer, one read */
        u64 s = 0;
        if (bpf_probe_read_user(&ab, sizeof(ab), (void *)(a + ATTEMPT_T_POS)) == 0) {
            s = *(u64 *)(ab.b + (ATTEMPT_S_POS - ATTEMPT_T_POS));
#if CLIENT_STREAM_MODE == 1
            if (s != 0 && bpf_probe_read_user(&s, sizeof(s), (void *)(s + CS_STREAM_POS)) != 0)
                s = 0;
#elif CLIENT_STREAM_MODE == 2
            if (s != 0)
                s += CS_STREAM_POS;
#endif
            if (s != 0)
                bpf_probe_read_user(&e->stream_id, sizeof(e->stream_id), (void *)(s + STREAM_ID_POS));
            struct conn_key ck = {.transport = ((struct go_iface *)ab.b)->data, .tgid = tgid};
            struct conn_ifaces ci = {};
            if (ck.transport != 0 &&
                bpf_probe_read_user(&ci, sizeof(ci), (void *)(ck.transport + H2C_REMOTEADDR_POS)) == 0) {
                int fresh = 0;
                struct conn_addrs *ca = conn_addrs_of(&ci, conn_cache.lookup(&ck), conn_scratch.lookup(&z), &fresh);
                if (ca && fresh)
                    conn_cache.update(&ck, ca);
                if (ca) {
                    __builtin_memcpy(&e->peer, &ca->remote, sizeof(e->peer));
                    __builtin_memcpy(&e->local, &ca->local, sizeof(e->local));
                }
            }
        }
    }
    e->target_len = 0;
    if (cc != 0) {
        u64 tl = 0;
        READ_GO_STRING(e->target, TARGET_MAX, cc + CC_TARGET_POS, tl);
        e->target_len = tl;
    }
    if (events.ringbuf_output(e, sizeof(*e), wakeup_flags(submitted.lookup(&z))) != 0)
        count_lost(lost.lookup(&z));
    return 0;
}
