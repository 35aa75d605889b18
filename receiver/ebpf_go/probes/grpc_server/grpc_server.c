/* grpc_server.c: one SERVER span per gRPC call (unary or streaming) served by grpc-go's HTTP/2
 * transport.
 *
 * Hooks (each at the jcc after the stack check: emulated, ~0.6 us; no RET probe, no probe per header
 * field or per message):
 *   transport.(*http2Server).operateHeaders(t, [ctx,] frame *http2.MetaHeadersFrame, ...)
 *     on the connection's reader goroutine, once per new stream: scans the decoded header fields for
 *     `traceparent` and, when there is one, keeps {t, stream id} -> parent in `grpc_incoming`.
 *     frame = word 2 (grpc < 1.60) or word 4 (>= 1.60, a ctx came first): OPH_FRAME_ARG.
 *   grpc.(*Server).handleStream(s, t ServerTransport, stream, ...)
 *     on the goroutine that runs the call, once per stream: the span starts; parent from
 *     grpc_incoming; the stream's context goes into ctx_spans (in-process children find the span).
 *     t = words 2-3 (data = *http2Server), stream = word 4: *transport.Stream (< 1.69), else
 *     *transport.ServerStream holding the Stream as a pointer (1.69-1.76) or by value (>= 1.77).
 *   transport.(*http2Server).writeStatus / WriteStatus(t, stream, st *status.Status)
 *     the final status, written by the same goroutine once the handler returned (grpc < 1.69: WriteStatus):
 *     the span ends with st's code and message, and the peer and local addresses of t.
 * A call whose status is never written (the handler panicked, the process died) leaves an entry in
 * the LRU maps that ages out; no span is made for it.
 *
 * -D constants from probes/grpc_server PROBE (offsets: DWARF > the bundled table > fallback):
 *   OPH_FRAME_ARG, MHF_FIELDS_POS, FH_STREAMID_POS, HF_SIZE         header frame
 *   STREAM_MODE (0 *Stream, 1 ServerStream{*Stream}, 2 ServerStream{Stream}), SS_STREAM_POS
 *   STREAM_ID_POS, STREAM_CTX_POS, STREAM_METHOD_POS, STREAM_BLOCK_LEN  transport.Stream
 *   REMOTE_ADDR_POS   the two adjacent net.Addr fields of http2Server, remote then local (peer.Addr and
 *                     LocalAddr, or remoteAddr and localAddr); resolved once per connection (conn_cache)
 *   TCPADDR_IP_POS, TCPADDR_PORT_POS, ITAB_TCPADDR (0: unknown, the address is checked for shape)
 *   STATUS_S_POS, SPB_CODE_POS, SPB_MESSAGE_POS   status.Status.s -> genproto Status.Code, Message
 *   PIN_DIR, CTX_SPANS, MAX_INFLIGHT, RINGBUF_PAGES, WAKEUP_EVERY
 */
#include "go_types.h"
#include "record.h"
#include "ctx_spans.h"
#include "traceparent.h"
#include "netaddr.h"

#define METHOD_MAX 128
#define MESSAGE_MAX 128
#define MAX_FIELDS 24      /* header fields looked at per new stream (a call sends ~10, metadata after them) */
#define TP_NAME_LEN 11     /* "traceparent" */

/* Per-call state, between handleStream and the status. */
struct grpc_server_call {
    u64 start_ns;
    u64 stream;            /* handleStream's stream argument: writeStatus gets the same pointer */
    u64 transport;         /* *http2Server */
    u64 ctx_data;          /* the stream context's data word: the key in ctx_spans (0: none kept) */
    u32 stream_id;         /* the HTTP/2 stream: with the connection, the key the stitcher joins on */
    u32 pad0;
    struct trace_ctx tc;
    u16 method_len;
    u8 pad[6];
    char method[METHOD_MAX];
};

/* The ring-buffer record, as declared in probes/grpc_server RECORD (checked by RECORD_ASSERTS). */
struct grpc_server_event {
    struct event_header h;   /*   0 */
    struct trace_ctx tc;     /*  32 */
    u32 code;                /*  72: grpc status code */
    u16 method_len;          /*  76 */
    u16 message_len;         /*  78 */
    struct addr peer;        /*  80 */
    struct addr local;       /* 104 */
    u32 stream_id;           /* 128 */
    u32 pad;
    char method[METHOD_MAX]; /* 136 */
    char message[MESSAGE_MAX]; /* 264, size 392 */
};
RECORD_ASSERTS;

struct incoming_key {
    u64 transport;
    u32 stream_id;
    u32 tgid;
};

/* grpc_inflight: goroutine_key -> call, from handleStream to the status. LRU: see the top. */
BPF_TABLE("lru_hash", struct goroutine_key, struct grpc_server_call, grpc_inflight, MAX_INFLIGHT);
/* grpc_incoming: {transport, stream id} -> the caller's trace context, from operateHeaders to
 * handleStream (another goroutine). Only streams that carried a traceparent have an entry. */
BPF_TABLE("lru_hash", struct incoming_key, struct trace_ctx, grpc_incoming, MAX_INFLIGHT);
/* scratch space, per CPU: the call being built, the record, the header fields read in one go */
BPF_PERCPU_ARRAY(call_scratch, struct grpc_server_call, 1);
BPF_PERCPU_ARRAY(event_out, struct grpc_server_event, 1);
struct field_buf {
    u8 b[MAX_FIELDS * HF_SIZE];
    char name[16];
    char value[64];
};
BPF_PERCPU_ARRAY(field_buf, struct field_buf, 1);
struct stream_block {
    u8 b[STREAM_BLOCK_LEN];
};
BPF_PERCPU_ARRAY(stream_block, struct stream_block, 1);
BPF_PERCPU_ARRAY(id_rng, u64, 1);
/* conn_cache: {transport, tgid} -> its two ends (netaddr.h: checked against the transport's fields) */
BPF_TABLE("lru_hash", struct conn_key, struct conn_addrs, conn_cache, MAX_INFLIGHT);
BPF_PERCPU_ARRAY(conn_scratch, struct conn_addrs, 1);

/* ---- operateHeaders: the traceparent of a new stream */

int uprobe_grpc_operateHeaders(struct pt_regs *ctx) {
    u64 t = GO_PARAM1(ctx);
#if OPH_FRAME_ARG == 4
    u64 frame = GO_PARAM4(ctx);
#else
    u64 frame = GO_PARAM2(ctx);
#endif
    if (t == 0 || frame == 0)
        return 0;
    u64 hf = 0;                     /* *HeadersFrame, embedded first: its FrameHeader holds the stream id */
    struct go_slice fields = {};
    if (bpf_probe_read_user(&hf, sizeof(hf), (void *)frame) != 0 || hf == 0)
        return 0;
    if (bpf_probe_read_user(&fields, sizeof(fields), (void *)(frame + MHF_FIELDS_POS)) != 0 || fields.ptr == 0)
        return 0;
    u32 z = 0;
    struct field_buf *fb = field_buf.lookup(&z);
    if (!fb)
        return 0;
    if (read_user_block(fb->b, sizeof(fb->b), fields.ptr) != 0)
        return 0;
    s64 n = fields.len < MAX_FIELDS ? fields.len : MAX_FIELDS;
    for (int i = 0; i < MAX_FIELDS; i++) {
        if (i >= n)
            break;
        struct go_string *name = (struct go_string *)(fb->b + i * HF_SIZE);
        struct go_string *value = (struct go_string *)(fb->b + i * HF_SIZE + 16);
        if (name->len != TP_NAME_LEN || value->len < TRACEPARENT_LEN || value->len > 63)
            continue;
        if (bpf_probe_read_user(fb->name, TP_NAME_LEN, (void *)name->ptr) != 0)
            continue;
        /* "traceparent": "tracepar" as a little-endian word, then "ent" */
        if (*(u64 *)fb->name != 0x7261706563617274ULL || fb->name[8] != 'e' || fb->name[9] != 'n' ||
            fb->name[10] != 't')
            continue;
        u32 vlen = value->len;
        if (bpf_probe_read_user(fb->value, TRACEPARENT_LEN, (void *)value->ptr) != 0)
            return 0;
        struct trace_ctx tc = {};
        if (parse_traceparent_value(fb->value, vlen, &tc) != 0)
            return 0;
        struct incoming_key ik = {.transport = t, .tgid = bpf_get_current_pid_tgid() >> 32};
        if (bpf_probe_read_user(&ik.stream_id, sizeof(ik.stream_id), (void *)(hf + FH_STREAMID_POS)) != 0)
            return 0;
        grpc_incoming.update(&ik, &tc);
        return 0;
    }
    return 0;
}

/* ---- handleStream: the span starts */

#define STREAM_AT(sb, pos, type) (*(type *)((sb)->b + (pos)))

int uprobe_grpc_handleStream(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    u64 t = GO_PARAM3(ctx);
    u64 stream = GO_PARAM4(ctx);
    if (stream == 0)
        return 0;
    struct grpc_server_call *old = grpc_inflight.lookup(&k);
    if (old && old->stream == stream)
        return 0;                /* morestack re-ran the prologue: same call */
    u32 z = 0;
    struct grpc_server_call *c = call_scratch.lookup(&z);
    struct stream_block *sb = stream_block.lookup(&z);
    if (!c || !sb)
        return 0;
    u64 s = stream;
#if STREAM_MODE == 1
    if (bpf_probe_read_user(&s, sizeof(s), (void *)(stream + SS_STREAM_POS)) != 0 || s == 0)
        return 0;
#elif STREAM_MODE == 2
    s = stream + SS_STREAM_POS;
#endif
    if (read_user_block(sb->b, STREAM_BLOCK_LEN, s) != 0)
        return 0;
    __builtin_memset(c, 0, sizeof(*c));
    c->start_ns = now;
    c->stream = stream;
    c->transport = t;
    struct go_string m = STREAM_AT(sb, STREAM_METHOD_POS, struct go_string);
    u64 mlen = 0;
    READ_GO_STRING_DATA(c->method, METHOD_MAX, m, mlen);
    c->method_len = mlen;

    c->stream_id = STREAM_AT(sb, STREAM_ID_POS, u32);
    struct incoming_key ik = {.transport = t, .stream_id = c->stream_id, .tgid = k.tgid};
    struct trace_ctx *parent = grpc_incoming.lookup(&ik);
    int keep = 0;
    if (parent) {
        __builtin_memcpy(&c->tc, parent, sizeof(c->tc));
        grpc_incoming.delete(&ik);
        keep = 1;
    }
    new_span_ids(id_rng.lookup(&z), &c->tc, keep);
#if CTX_SPANS
    c->ctx_data = STREAM_AT(sb, STREAM_CTX_POS + 8, u64);
#endif
    grpc_inflight.update(&k, c);
    if (c->ctx_data != 0) {
        struct ctx_key ck = {.ptr = c->ctx_data, .tgid = k.tgid};
        ctx_spans.update(&ck, &c->tc);
    }
#if G_SPANS
    struct trace_ctx gtc = c->tc;   /* function spans on this goroutine are its children */
    gtc.server_goroutine = 1;
    g_spans.update(&k, &gtc);
#endif
    return 0;
}

/* ---- writeStatus: the span ends */

int uprobe_grpc_writeStatus(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    struct grpc_server_call *c = grpc_inflight.lookup(&k);
    if (!c || c->stream != GO_PARAM2(ctx))
        return 0;                /* not the status of the call this goroutine serves */
    u32 z = 0;
    if (c->ctx_data != 0) {      /* the span ends: its context and goroutine no longer lead to it */
        struct ctx_key ck = {.ptr = c->ctx_data, .tgid = k.tgid};
        ctx_spans.delete(&ck);
    }
#if G_SPANS
    g_spans.delete(&k);
#endif
    if (!SAMPLED(&c->tc)) {      /* no record: counted, and the call forgotten (before any copying) */
        count_lost(unsampled.lookup(&z));
        grpc_inflight.delete(&k);
        return 0;
    }
    struct grpc_server_event *e = event_out.lookup(&z);
    if (!e) {
        grpc_inflight.delete(&k);
        return 0;
    }
    e->h.kind = EVENT_KIND_GRPC_SERVER;
    e->h.tgid = k.tgid;
    e->h.start_ns = c->start_ns;
    e->h.end_ns = now;
    e->h.goroutine = k.g;
    __builtin_memcpy(&e->tc, &c->tc, sizeof(e->tc));
    e->method_len = c->method_len;
    e->stream_id = c->stream_id;
    e->pad = 0;
    bpf_probe_read_kernel(e->method, METHOD_MAX, c->method);
    /* status.Status{s *spb.Status}: a nil s is OK */
    e->code = 0;
    e->message_len = 0;
    u64 st = GO_PARAM3(ctx), spb = 0;
    if (st != 0 && bpf_probe_read_user(&spb, sizeof(spb), (void *)(st + STATUS_S_POS)) == 0 && spb != 0) {
        s32 code = 0;
        struct go_string msg = {};
        bpf_probe_read_user(&code, sizeof(code), (void *)(spb + SPB_CODE_POS));
        e->code = code;
        if (code != 0 && bpf_probe_read_user(&msg, sizeof(msg), (void *)(spb + SPB_MESSAGE_POS)) == 0) {
            u64 ml = 0;
            READ_GO_STRING_DATA(e->message, MESSAGE_MAX, msg, ml);
            e->message_len = ml;
        }
    }
    __builtin_memset(&e->peer, 0, sizeof(e->peer));
    __builtin_memset(&e->local, 0, sizeof(e->local));
    struct conn_key ck = {.transport = c->transport, .tgid = k.tgid};
    grpc_inflight.delete(&k);
    struct conn_ifaces ci = {};
    if (ck.transport != 0 && bpf_probe_read_user(&ci, sizeof(ci), (void *)(ck.transport + REMOTE_ADDR_POS)) == 0) {
        int fresh = 0;
        struct conn_addrs *ca = conn_addrs_of(&ci, conn_cache.lookup(&ck), conn_scratch.lookup(&z), &fresh);
        if (ca && fresh)
            conn_cache.update(&ck, ca);
        if (ca) {
            __builtin_memcpy(&e->peer, &ca->remote, sizeof(e->peer));
            __builtin_memcpy(&e->local, &ca->local, sizeof(e->local));
        }
    }
    if (events.ringbuf_output(e, sizeof(*e), wakeup_flags(submitted.lookup(&z))) != 0)
        count_lost(lost.lookup(&z));
    return 0;
}
