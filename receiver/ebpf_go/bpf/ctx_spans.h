/* ctx_spans.h: the map that joins the probes of one binary into one trace.
 *
 * ctx_spans: {Go context data pointer, tgid} -> trace_ctx of the span running under that context.
 * Written by the probes whose spans are parents (probes declaring context "writes": the net/http
 * server, at entry; deleted at the end), read by those looking for a parent (context "reads": the
 * net/http client, database/sql), which walk a call's context up its parents: every std Context
 * keeps its parent Context as its first field, so a parent's data word is at +8 (valueCtx,
 * cancelCtx, timerCtx, ...). Pinned under PIN_DIR: each probe is a program of its own.
 *
 * BCC rewrites map calls (`ctx_spans.lookup(...)`) only where they are written in the .c file
 * itself, so the walk's loop stays in each reader; its step is here. */
#ifndef OTELGO_CTX_SPANS_H
#define OTELGO_CTX_SPANS_H

#ifndef CTX_WALK_MAX
#define CTX_WALK_MAX 16   /* contexts walked up at most */
#endif
#define CTX_SPANS_MAX 16384

struct ctx_key {
    u64 ptr;    /* context.Context data word */
    u32 tgid;
    u32 pad;
};

BPF_TABLE_PINNED("lru_hash", struct ctx_key, struct trace_ctx, ctx_spans, CTX_SPANS_MAX, PIN_DIR "/ctx_spans");

/* g_spans: {goroutine, tgid} -> trace_ctx of the span the goroutine is running (G_SPANS=1 only: a
 * binary with function spans, probes/functions). Written by the servers at entry (deleted at their end,
 * marked `server_goroutine`: the parent of a function called on that goroutine) and by a function span
 * while it runs. The readers look here first for a function span (a call made inside one is its
 * child), then walk the context as without function spans: a server entry is not theirs to use, so a
 * query with context.Background() in a handler stays a root as it is without function spans. */
#define G_SPAN_IS_FUNCTION(tc) ((tc) && !(tc)->server_goroutine)
#ifndef G_SPANS
#define G_SPANS 0
#endif
#if G_SPANS
BPF_TABLE_PINNED("lru_hash", struct goroutine_key, struct trace_ctx, g_spans, CTX_SPANS_MAX, PIN_DIR "/g_spans");
#endif

/* The data word of the parent of the context whose data word is `p`, 0 when there is none. */
static __always_inline u64 ctx_parent(u64 p) {
    u64 next = 0;
    if (bpf_probe_read_user(&next, sizeof(next), (void *)(p + 8)) != 0)
        return 0;
    return next;
}

#endif
