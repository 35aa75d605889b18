/* functions.c: an INTERNAL span per call of the Go functions a user names (receivers::ebpf_go::functions).
 *
 * Per named function `id`, programs generated from FN_TABLE (probes/functions chooses their points):
 *   uprobe_fn_entry_<id>  at the cheap entry point (the jcc after the stack check: emulated), or
 *   uprobe_fn_call_<id>   at each `call` of it, where its first instruction would be single-stepped
 *   uprobe_fn_end_<id>    at every RET of the function (single-stepped), or
 *   uprobe_fn_ret_<id>    at the first emulated instruction after each call of it, where every call
 *                         of it is a direct one (gobinary/callers.py) and each has such a point
 * and one for the whole binary:
 *   uprobe_fn_panic       at runtime.gopanic: the panicking goroutine's open calls end there, Error.
 *
 * A call is a frame on its goroutine's stack (fn_stacks: goroutine -> up to FN_DEPTH frames). The
 * entry and the RET of one call meet on the goroutine and on `g.stack.hi - rsp`, which is the same at
 * both points (the entry point comes before the frame is set up, a RET after it is torn down) and
 * survives the copies of a growing goroutine stack (rsp itself does not). That makes recursion exact,
 * and a RET of a call that was not pushed (depth or rate limit) is recognised and ignored.
 *
 * Parent, at entry: the goroutine's current span (g_spans, ctx_spans.h: the server span of the request
 * this goroutine serves, or the innermost function span on it); else a context in argument words 1-2 or
 * 2-3 (a function or method taking ctx first) walked up to a tracked context (ctx_spans: a goroutine
 * started for the request); else the span is a root. A function span without `min_duration` becomes
 * the goroutine's current span until it ends, so the database/sql, HTTP and gRPC client calls it makes
 * (and functions it calls) are its children. A span with `min_duration` may be dropped at its end, so
 * it is never a parent: what runs under it hangs from its parent instead, and no trace loses a link.
 *
 * Protection: each function has a token window of FN_RATE spans per second (excess counted in
 * fn_stats.dropped_rate, not pushed); fn_stats counts calls seen and spans sent per function, read by
 * the receiver as self-metrics.
 *
 * -D constants from probes/functions PROBE:
 *   FN_TABLE      FN(id, min_duration_ns, spans_per_second) for every function, in id order
 *   FN_COUNT      number of functions
 *   FN_GOROUTINES goroutines inside traced calls at once (LRU)
 *   PIN_DIR, CTX_WALK_MAX, CTX_SPANS, G_SPANS, RINGBUF_PAGES, WAKEUP_EVERY, RECORD_ASSERTS
 */
#include "go_types.h"
#include "record.h"
#include "ctx_spans.h"

#define FN_DEPTH 16            /* open calls tracked per goroutine: deeper recursion is counted, not traced */
#define G_STACK_HI_POS 8       /* runtime.g starts with stack{lo, hi uintptr} in every Go release */
#define FN_PARENT_NONE 0
#define FN_PARENT_GOROUTINE 1
#define FN_PARENT_CONTEXT 2
#define FN_PREV_BASE 0xff        /* fn_frame.prev: g_spans was the stack's base at entry */

struct fn_frame {
    u64 start_ns;
    u64 sp_off;              /* g.stack.hi - rsp at entry */
    struct trace_ctx tc;
    u32 fn;
    u8 is_parent;            /* 1: this span is g_spans while it runs (no min_duration) */
    u8 parent_source;        /* FN_PARENT_* */
    u8 prev;                 /* what g_spans was at entry: the frame of that index, or FN_PREV_BASE */
    u8 pad;
};

struct fn_stack {
    u32 depth;
    u8 has_base;
    u8 pad[3];
    struct trace_ctx base;   /* g_spans when the first frame was pushed: restored when no parent frame is left */
    struct fn_frame f[FN_DEPTH];
};

/* The ring-buffer record, as declared in probes/functions RECORD (checked by RECORD_ASSERTS). */
struct fn_event {
    struct event_header h;   /*  0 */
    struct trace_ctx tc;     /* 32 */
    u32 fn;                  /* 72: FN_TABLE id */
    u8 panicked;             /* 76: ended by runtime.gopanic */
    u8 parent_source;        /* 77 */
    u16 depth;               /* 78: frames below it on the goroutine */
};
RECORD_ASSERTS;

/* Per function, shared by all CPUs (atomic adds; the window reset may race by a few spans). */
struct fn_stat {
    u64 calls;               /* entries seen (re-entries of morestack not counted) */
    u64 spans;               /* records sent */
    u64 dropped_rate;        /* over FN_RATE in the current second */
    u64 dropped_short;       /* shorter than min_duration */
    u64 dropped_depth;       /* FN_DEPTH calls already open on the goroutine */
    u64 window_start;
    u64 window_count;
    u64 pad;
};

BPF_TABLE("lru_hash", struct goroutine_key, struct fn_stack, fn_stacks, FN_GOROUTINES);
BPF_PERCPU_ARRAY(fn_empty, struct fn_stack, 1);   /* never written: the zero stack a goroutine starts with */
BPF_ARRAY(fn_stats, struct fn_stat, FN_COUNT);
BPF_PERCPU_ARRAY(id_rng, u64, 1);
/* events, lost, submitted (record.h): finished calls (struct fn_event) -> user space. */

/* Frame `i` of stack `s`. The mask is applied after a compiler barrier: clang drops it where an earlier
 * test already bounds i, and the verifier, tracking another register, then sees an unbounded index. */
static __always_inline struct fn_frame *frame_at(struct fn_stack *s, u32 i) {
    asm volatile("" : "+r"(i));
    return &s->f[i & (FN_DEPTH - 1)];
}

/* g.stack.hi - rsp as the callee's entry sees it: `in_caller` 8 at a call instruction or after the
 * call returned (rsp is 8 higher there: no return address on the stack). */
static __always_inline int stack_offset(struct goroutine_key *k, struct pt_regs *ctx, u64 in_caller, u64 *off) {
    u64 hi = 0;
    if (bpf_probe_read_user(&hi, sizeof(hi), (void *)(k->g + G_STACK_HI_POS)) != 0 || hi < ctx->sp)
        return -1;
    *off = hi - ctx->sp + in_caller;
    return 0;
}

#if CTX_SPANS
static __always_inline int parent_from_ctx(u64 p, u32 tgid, struct trace_ctx *out) {
    struct ctx_key ck = {.tgid = tgid};
    for (int i = 0; i < CTX_WALK_MAX; i++) {
        if (p < 4096)
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
#endif

static __always_inline void emit(struct goroutine_key *k, struct fn_frame *f, u64 end_ns, u8 panicked, u32 depth,
                                 struct fn_stat *st) {
    u32 z = 0;
    if (!SAMPLED(&f->tc)) {
        count_lost(unsampled.lookup(&z));
        return;
    }
    struct fn_event *e = events.ringbuf_reserve(sizeof(struct fn_event));
    if (!e) {
        count_lost(lost.lookup(&z));
        return;
    }
    e->h.kind = EVENT_KIND_FUNCTION;
    e->h.tgid = k->tgid;
    e->h.start_ns = f->start_ns;
    e->h.end_ns = end_ns;
    e->h.goroutine = k->g;
    __builtin_memcpy(&e->tc, &f->tc, sizeof(e->tc));
    e->fn = f->fn;
    e->panicked = panicked;
    e->parent_source = f->parent_source;
    e->depth = depth;
    events.ringbuf_submit(e, wakeup_flags(submitted.lookup(&z)));
    if (st)
        __sync_fetch_and_add(&st->spans, 1);
}

static __always_inline int fn_entry(struct pt_regs *ctx, u32 id, u64 rate, u32 is_parent, u64 in_caller) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    u64 sp_off = 0;
    if (stack_offset(&k, ctx, in_caller, &sp_off) != 0)
        return 0;
    struct fn_stack *s = fn_stacks.lookup(&k);
    if (s) {
        u32 d = s->depth;
        if (d > 0 && d <= FN_DEPTH) {
            struct fn_frame *top = frame_at(s, d - 1);
            if (top->fn == id && top->sp_off == sp_off)
                return 0;        /* morestack re-ran the prologue: the same call */
        }
    }
    struct fn_stat *st = fn_stats.lookup(&id);
    if (!st)
        return 0;
    __sync_fetch_and_add(&st->calls, 1);
    if (now - st->window_start > 1000000000ULL) {
        st->window_start = now;
        st->window_count = 0;
    }
    if (__sync_fetch_and_add(&st->window_count, 1) >= rate) {
        __sync_fetch_and_add(&st->dropped_rate, 1);
        return 0;
    }
    if (!s) {
        u32 z = 0;
        struct fn_stack *empty = fn_empty.lookup(&z);
        if (!empty)
            return 0;
        fn_stacks.update(&k, empty);
        s = fn_stacks.lookup(&k);
        if (!s)
            return 0;
    }
    u32 d = s->depth;
    /* the top frame is no deeper than this call (sp_off grows with depth): it is gone without its RET
     * (runtime.Goexit) */
    if (d > 0 && d <= FN_DEPTH && frame_at(s, d - 1)->sp_off >= sp_off)
        d--;
    if (d >= FN_DEPTH) {
        __sync_fetch_and_add(&st->dropped_depth, 1);
        return 0;
    }
    u8 prev = FN_PREV_BASE;
    if (d > 0) {
        struct fn_frame *below = frame_at(s, d - 1);
        prev = below->is_parent ? (u8)(d - 1) : below->prev;
    }
    struct fn_frame *f = frame_at(s, d);
    f->prev = prev;
    f->start_ns = now;
    f->sp_off = sp_off;
    f->fn = id;
    f->is_parent = is_parent;
    f->parent_source = FN_PARENT_NONE;
    int found = 0;
#if G_SPANS
    struct trace_ctx *gp = g_spans.lookup(&k);
    if (gp) {
        __builtin_memcpy(&f->tc, gp, sizeof(f->tc));
        f->tc.server_goroutine = 0;
        f->parent_source = FN_PARENT_GOROUTINE;
        found = 1;
    }
    if (d == 0) {
        s->has_base = gp != 0;
        if (gp)
            __builtin_memcpy(&s->base, gp, sizeof(s->base));
    }
#endif
#if CTX_SPANS
    if (!found && (parent_from_ctx(GO_PARAM2(ctx), k.tgid, &f->tc) == 0 ||
                   parent_from_ctx(GO_PARAM3(ctx), k.tgid, &f->tc) == 0)) {
        f->parent_source = FN_PARENT_CONTEXT;
        found = 1;
    }
#endif
    u32 z = 0;
    if (found) {
        __builtin_memcpy(f->tc.parent_span_id, f->tc.span_id, sizeof(f->tc.parent_span_id));
        f->tc.remote_parent = 0;
        new_span_ids(id_rng.lookup(&z), &f->tc, 1);
    } else {
        __builtin_memset(&f->tc, 0, sizeof(f->tc));
        new_span_ids(id_rng.lookup(&z), &f->tc, 0);
    }
    s->depth = d + 1;
#if G_SPANS
    if (is_parent)
        g_spans.update(&k, &f->tc);
#endif
    return 0;
}

/* g_spans after the frame `f` (a parent) is gone: what it was at f's entry (fn_frame.prev). */
static __always_inline void restore_goroutine_span(struct goroutine_key *k, struct fn_stack *s, struct fn_frame *f) {
#if G_SPANS
    if (f->prev != FN_PREV_BASE) {
        g_spans.update(k, &frame_at(s, f->prev)->tc);
    } else if (s->has_base) {
        g_spans.update(k, &s->base);
    } else {
        g_spans.delete(k);
    }
#endif
}

static __always_inline int fn_end(struct pt_regs *ctx, u32 id, u64 min_ns, u64 in_caller) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
    struct fn_stack *s = fn_stacks.lookup(&k);
    if (!s)
        return 0;
    u64 sp_off = 0;
    if (stack_offset(&k, ctx, in_caller, &sp_off) != 0)
        return 0;
    u32 d = s->depth;
    /* a frame deeper than this one whose RET never came (runtime.Goexit unwound it): dropped. One per
     * RET keeps the verifier's paths few; such frames are rare and the next RETs take the rest. */
    if (d > 0 && d <= FN_DEPTH && frame_at(s, d - 1)->sp_off > sp_off)
        d--;
    if (d == 0 || d > FN_DEPTH) {
        s->depth = 0;
        fn_stacks.delete(&k);
        return 0;
    }
    u32 top = d - 1;
    struct fn_frame *f = frame_at(s, top);
    if (f->fn != id || f->sp_off != sp_off) {
        s->depth = d;
        return 0;                /* a call that was not pushed (rate or depth limit) */
    }
    struct fn_stat *st = fn_stats.lookup(&id);
    if (now - f->start_ns >= min_ns)
        emit(&k, f, now, 0, top, st);
    else if (st)
        __sync_fetch_and_add(&st->dropped_short, 1);
    if (f->is_parent)
        restore_goroutine_span(&k, s, f);
    s->depth = top;
    if (top == 0)
        fn_stacks.delete(&k);
    return 0;
}

/* runtime.gopanic(e any): every open call of this goroutine ends here with Error. A panic unwinds the
 * frames up to a deferred recover(), which may sit in one of them: its span still ends at the panic (the
 * RET that follows a recovery finds no frame and is ignored). The goroutine's span is cleared too: a
 * server span whose handler panics never ends, and the goroutine may be reused. */
int uprobe_fn_panic(struct pt_regs *ctx) {
    u64 now = bpf_ktime_get_ns();
    struct goroutine_key k = goroutine_key(ctx);
#if G_SPANS
    g_spans.delete(&k);
#endif
    struct fn_stack *s = fn_stacks.lookup(&k);
    if (!s)
        return 0;
    u32 d = s->depth;
    for (int i = 0; i < FN_DEPTH; i++) {
        if ((u32)i >= d)
            break;
        struct fn_frame *f = frame_at(s, i);
        u32 id = f->fn;
        emit(&k, f, now, 1, i, fn_stats.lookup(&id));
    }
    fn_stacks.delete(&k);
    return 0;
}

/* Per function, the programs its points run (probes/functions picks the points):
 *   entry_<id> at its entry, call_<id> at each call of it (where its entry is a single-stepped instruction),
 *   end_<id> at each RET, ret_<id> after each call of it (where every call of it is a direct one). */
#define FN(id, min_ns, rate)                                                                      \
    int uprobe_fn_entry_##id(struct pt_regs *ctx) { return fn_entry(ctx, id, rate, min_ns == 0, 0); } \
    int uprobe_fn_call_##id(struct pt_regs *ctx) { return fn_entry(ctx, id, rate, min_ns == 0, 8); }  \
    int uprobe_fn_end_##id(struct pt_regs *ctx) { return fn_end(ctx, id, min_ns, 0); }                \
    int uprobe_fn_ret_##id(struct pt_regs *ctx) { return fn_end(ctx, id, min_ns, 8); }
FN_TABLE
