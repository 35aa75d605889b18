/* go_types.h: Go values as BPF sees them, shared by every probe program in bpf/.
 *
 * Programs are compiled by BCC once per Go binary; receiver/ebpf_go/loader.py passes that binary's
 * layout as -D constants (struct field offsets, Go version features), so this header holds no
 * numbers that depend on a Go version except the ABI itself (amd64 regabi, Go >= 1.17).
 */
#ifndef OTELGO_GO_TYPES_H
#define OTELGO_GO_TYPES_H

#include <uapi/linux/ptrace.h>

/* bpf_probe_read_user under a name BCC's rewriter does not know. BCC 0.26 (Debian 12) reads all of
 * /proc/kallsyms into a new table at every call it sees by that name (to fall back to bpf_probe_read
 * on kernels without the helper, < 5.5; our ring buffers need 5.8): 20-60 ms per call site, 1.2 of
 * the 2.0 s compile of nethttp_server.c. Same helper, same declaration as BCC's helpers.h: the
 * compiled instructions are byte for byte the same (benchmarks/README.md, cold start). */
static int (*otelgo_probe_read_user)(void *dst, __u32 size, const void *unsafe_ptr) =
    (void *)BPF_FUNC_probe_read_user;
#define bpf_probe_read_user otelgo_probe_read_user

/* ---- Go register ABI (amd64, ABIInternal): integer argument words 1..9 and the goroutine. */
#define GO_PARAM1(ctx) ((ctx)->ax)
#define GO_PARAM2(ctx) ((ctx)->bx)
#define GO_PARAM3(ctx) ((ctx)->cx)
#define GO_PARAM4(ctx) ((ctx)->di)
#define GO_PARAM5(ctx) ((ctx)->si)
#define GO_PARAM6(ctx) ((ctx)->r8)
#define GO_PARAM7(ctx) ((ctx)->r9)
#define GO_PARAM8(ctx) ((ctx)->r10)
#define GO_PARAM9(ctx) ((ctx)->r11)
/* R14 holds the running g at function entry and at every RET (regabi). */
#define GOROUTINE(ctx) ((u64)(ctx)->r14)

/* ---- Go value layouts. */
struct go_string {
    u64 ptr;
    s64 len;
};

struct go_slice {
    u64 ptr;
    s64 len;
    s64 cap;
};

struct go_iface {
    u64 tab;  /* itab (non-empty interface) or type (any) */
    u64 data;
};

/* Entry and return of one call meet on this key: the goroutine (g pointer) in one process.
 * One BPF program serves every traced process of a binary, so the pid is part of the key. */
struct goroutine_key {
    u64 g;
    u32 tgid;
    u32 pad;
};

static __always_inline struct goroutine_key goroutine_key(struct pt_regs *ctx) {
    struct goroutine_key k = {};
    k.g = GOROUTINE(ctx);
    k.tgid = bpf_get_current_pid_tgid() >> 32;
    return k;
}

/* W3C trace context as chosen at entry (ids) or read from an incoming traceparent. */
struct trace_ctx {
    u8 trace_id[16];
    u8 span_id[8];
    u8 parent_span_id[8];  /* all zero: root span */
    u8 flags;              /* W3C trace-flags (bit 0 sampled) */
    u8 remote_parent;      /* 1 when the parent came from a valid incoming traceparent */
    u8 server_goroutine;   /* in g_spans only: a server's span, for function spans (ctx_spans.h) */
    u8 pad[5];
};

static __always_inline void random_bytes(u8 *dst, int words) {
    u32 *w = (u32 *)dst;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i < words)
            w[i] = bpf_get_prandom_u32();
    }
}

static __always_inline u64 splitmix64(u64 *state) {
    u64 z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Head sampling (receiver/ebpf_go/sampler.py), decided where the ids are made. Without SAMPLER every
 * span is recorded and a remote parent's flags are kept as they came. With it: a root by
 * SAMPLER_ROOT (0 always on, 1 always off, 2 the trace id's low 56 bits >= SAMPLER_THRESHOLD), a
 * span with a remote parent by the parent's sampled flag (SAMPLER_PARENT) or else by the root rule,
 * a span with a local parent keeps the flags it copied from it. */
#ifndef SAMPLER
#define SAMPLER 0
#endif
#if SAMPLER
static __always_inline u8 sampler_root(const u8 *trace_id) {
#if SAMPLER_ROOT == 2
    u64 r = 0;
#pragma unroll
    for (int i = 9; i < 16; i++)
        r = (r << 8) | trace_id[i];
    return r >= SAMPLER_THRESHOLD;
#else
    return SAMPLER_ROOT == 0;
#endif
}
#endif

static __always_inline void sample(struct trace_ctx *tc, int keep_trace) {
#if SAMPLER
    if (!keep_trace || (tc->remote_parent && !SAMPLER_PARENT))
        tc->flags = (tc->flags & ~1) | sampler_root(tc->trace_id);
#endif
}

/* Whether a span is recorded: a ring-buffer record for it (an unsampled one is counted instead). */
#define SAMPLED(tc) (!SAMPLER || ((tc)->flags & 1))

/* Fresh ids: a new trace (sampled) unless keep_trace (the caller set trace_id from a parent), and a
 * new span id, from `rng`: the per-CPU state of a splitmix64 generator, seeded from
 * bpf_get_prandom_u32 on first use (one helper call per id word costs ~50 ns here, six of them
 * ~0.3 us per span). Each program declares its own (BCC rewrites map calls in the .c file only):
 *     BPF_PERCPU_ARRAY(id_rng, u64, 1);   ...   new_span_ids(id_rng.lookup(&zero), &tc, keep);
 * rng NULL: one bpf_get_prandom_u32 per word. */
static __always_inline void new_span_ids(u64 *rng, struct trace_ctx *tc, int keep_trace) {
    if (rng) {
        if (*rng == 0)
            *rng = ((u64)bpf_get_prandom_u32() << 32) ^ bpf_get_prandom_u32() ^ bpf_ktime_get_ns();
        if (!keep_trace) {
            *(u64 *)tc->trace_id = splitmix64(rng);
            *(u64 *)(tc->trace_id + 8) = splitmix64(rng);
            tc->flags = 1;
        }
        *(u64 *)tc->span_id = splitmix64(rng);
        sample(tc, keep_trace);
        return;
    }
    if (!keep_trace) {
        random_bytes(tc->trace_id, 4);
        tc->flags = 1;
    }
    random_bytes(tc->span_id, 2);
    sample(tc, keep_trace);
}

/* A Go string whose header is already in BPF memory: its bytes into dst[0..max) (the rest is left
 * as is); sets out_len to the number of bytes copied. `max` must be a compile-time constant. */
#define READ_GO_STRING_DATA(dst, max, str, out_len)                                       \
    do {                                                                                  \
        struct go_string __s = (str);                                                     \
        out_len = 0;                                                                      \
        if (__s.ptr != 0 && __s.len > 0) {                                                \
            u64 __n = __s.len;                                                            \
            if (__n > (max)) __n = (max);                                                 \
            if (__n > 0 && bpf_probe_read_user((dst), __n, (void *)__s.ptr) == 0)         \
                out_len = __n;                                                            \
        }                                                                                 \
    } while (0)

/* Read `size` bytes (a constant) of a Go object that may end on a page the program never wrote: Go
 * takes fresh heap from the OS without touching it, the kernel maps a page at its first write, and a
 * uprobe cannot fault one in, so one read of a map bucket, a swiss group or a Request over such a page
 * fails whole (seen: a traceparent missed in about 1 of 100 fresh processes). Then the bytes up to the
 * page boundary are read, and the rest stays zero (the failed read zeroed dst), which is what an
 * untouched anonymous page holds. `dst` must be map memory: the length goes through it, so that the
 * verifier does not tie `src` to a variable read size (precision tracking then kept the callers'
 * states apart: the classic-map walk went over the 1M instruction limit).
 * Returns 0, or -1 when even the first page cannot be read (dst is all zeros then). */
static __always_inline int read_user_block(u8 *dst, u32 size, u64 src) {
    if (bpf_probe_read_user(dst, size, (void *)src) == 0)
        return 0;
    *(volatile u32 *)dst = 4096 - (u32)(src & 4095);
    u64 head = *(volatile u32 *)dst & 4095;
    *(volatile u32 *)dst = 0;
    if (head == 0 || head >= size)
        return -1;               /* the object does not cross a page: nothing more to try */
    asm volatile("" : "+r"(head));   /* keep the bound checked on the register the helper gets */
    if (head >= size)
        return -1;
    return bpf_probe_read_user(dst, head, (void *)src) == 0 ? 0 : -1;
}

/* The same for a Go string whose header is at user address `hdr_addr` (one more user read). */
#define READ_GO_STRING(dst, max, hdr_addr, out_len)                                       \
    do {                                                                                  \
        struct go_string __h = {};                                                        \
        out_len = 0;                                                                      \
        if (bpf_probe_read_user(&__h, sizeof(__h), (void *)(hdr_addr)) == 0)              \
            READ_GO_STRING_DATA(dst, max, __h, out_len);                                  \
    } while (0)

#endif
