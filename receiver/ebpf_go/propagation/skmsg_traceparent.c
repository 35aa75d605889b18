/* skmsg_traceparent.c: insert a `traceparent` header into outgoing HTTP/1.x requests at the socket.
 *
 * Works under kernel lockdown (no bpf_probe_write_user): the request bytes are changed in the
 * kernel's copy, on their way out, by an sk_msg program.
 *   sock_ops (cgroup v2 root): every client socket of a traced process (`traced`, filled by
 *     skmsg.py) that becomes ESTABLISHED joins `socks`;
 *   sk_msg (verdict on `socks`): on each send, if the uprobe side left a pending trace context for
 *     this connection (nethttp_client.c, `(*Request).write` entry), check that the bytes are the
 *     start of that HTTP/1.x request and insert `traceparent: 00-<trace>-<span>-<flags>\r\n`
 *     right after the request line. Anything uncertain leaves the bytes unchanged and is counted.
 *
 * Loaded once per collector by receiver/ebpf_go/propagation/skmsg.py. The two maps shared with the
 * uprobe programs are pinned under PIN_DIR (the uprobe programs declare the same pins).
 * Constants (-D): PIN_DIR (string), FRESH_NS, SCAN_MAX (power of two, <= 8192).
 */
#include <uapi/linux/bpf.h>

#define TP_LINE_LEN 70          /* "traceparent: " 13 + value 55 + "\r\n" 2 */

#include "traceparent_handoff.h"

#define OUTCOME_INJECTED 1
#define OUTCOME_STALE 2         /* older than FRESH_NS */
#define OUTCOME_NOT_HTTP 3      /* payload does not start with "<method> " */
#define OUTCOME_EXISTING 4      /* the request already carries a traceparent header */
#define OUTCOME_SPLIT 5         /* request line or header block not complete in this send */
#define OUTCOME_PULL_FAILED 6
#define OUTCOME_PUSH_FAILED 7
#define OUTCOME_BAD_VERSION 8   /* request line does not end with " HTTP/1.x" */
#define N_COUNTERS 16
#define COUNT_SAME_THREAD 12
#define COUNT_OTHER_THREAD 13
#define COUNT_SOCK_HELD 14      /* connections another sk_msg program already holds (EBUSY) */
#define COUNT_SOCK_NOT_ADDED 15 /* connections not added for any other reason (map full, ...) */

/* socks: connection 4-tuple -> socket; filled by sock_ops, its sends run skmsg_traceparent. */
struct sock_key {
    u32 family;
    u32 lport;
    u32 rport;
    u32 lip[4];
    u32 rip[4];
};
BPF_SOCKHASH(socks, struct sock_key, 65536);
/* tp_pending: conn_key -> tp_pending; written by nethttp_client.c, consumed here. */
BPF_TABLE_PINNED("lru_hash", struct conn_key, struct tp_pending, tp_pending, 16384, PIN_DIR "/tp_pending");
/* tp_result: client span id (u64) -> tp_result; written here, read and deleted by nethttp_client.c. */
BPF_TABLE_PINNED("lru_hash", u64, struct tp_result, tp_result, 16384, PIN_DIR "/tp_result");
/* counts[OUTCOME_* | COUNT_*]: read by skmsg.py for the self-metrics. */
BPF_ARRAY(counts, u64, N_COUNTERS);

static __always_inline void count(u32 i) {
    u64 *c = counts.lookup(&i);
    if (c)
        __sync_fetch_and_add(c, 1);
}

/* traced: tgids of the processes the collector traces (skmsg.py watch/unwatch). Only their
 * connections join `socks`: a socket in a sockhash with an sk_msg program sends through the
 * kernel's sk_msg path, which costs every send (+0.3-0.5 us measured on loopback), so the other
 * processes of the host keep the plain path. */
BPF_HASH(traced, u32, u8, 65536);
/* connecting: socket cookie -> 1, for a connect() a traced process made, until it is established. */
BPF_TABLE("lru_hash", u64, u8, connecting, 65536);

int sockops_track(struct bpf_sock_ops *skops) {
    if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* connect() runs in the process (ESTABLISHED comes later, in softirq, where the process is
         * unknown): remember the socket if the process is traced. */
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (traced.lookup(&tgid)) {
            u64 cookie = bpf_get_socket_cookie(skops);
            u8 one = 1;
            connecting.update(&cookie, &one);
        }
        return 0;
    }
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 0;
    u64 cookie = bpf_get_socket_cookie(skops);
    if (!connecting.lookup(&cookie))
        return 0;
    connecting.delete(&cookie);
    struct sock_key k = {};
    k.family = skops->family;
    k.lport = skops->local_port;
    k.rport = bpf_ntohl(skops->remote_port);
    if (skops->family == 2 /* AF_INET */) {
        k.lip[0] = skops->local_ip4;
        k.rip[0] = skops->remote_ip4;
    } else if (skops->family == 10 /* AF_INET6 */) {
        k.lip[0] = skops->local_ip6[0];
        k.lip[1] = skops->local_ip6[1];
        k.lip[2] = skops->local_ip6[2];
        k.lip[3] = skops->local_ip6[3];
        k.rip[0] = skops->remote_ip6[0];
        k.rip[1] = skops->remote_ip6[1];
        k.rip[2] = skops->remote_ip6[2];
        k.rip[3] = skops->remote_ip6[3];
    } else {
        return 0;
    }
    int err = socks.sock_hash_update(skops, &k, BPF_NOEXIST);
    /* A socket joins one sk_msg program only: one attached earlier (a second collector, a CNI's
     * socket acceleration, a leaked attach) takes it and ours never sees its sends. Counted so that
     * the collector can say so instead of injecting nothing in silence. */
    if (err == -16 /* EBUSY */)
        count(COUNT_SOCK_HELD);
    else if (err && err != -17 /* EEXIST: the 4-tuple is already in */)
        count(COUNT_SOCK_NOT_ADDED);
    return 0;
}

/* ---- the byte scan. The verifier cannot follow a 4 KiB byte loop in one program (it keeps a
 * pending branch per byte, and gives up past 8192), so the scan goes CHUNK bytes per program run:
 * skmsg_traceparent scans the first chunk, then tail-calls skmsg_scan_more, which scans the next
 * and tail-calls itself, SCAN_MAX / CHUNK runs at most. The state lives in a per-CPU map value. */
#define CHUNK 512

struct scan_state {
    struct tp_pending p;  /* the pending context being inserted */
    u32 same;           /* sk_msg runs on the uprobe's thread */
    u32 next;           /* offset the next chunk starts at */
    u32 first_nl;       /* index of the request line's '\n' (0: not found yet) */
    u32 end;            /* index just past "\r\n\r\n" (0: not found yet) */
    u32 has_tp;
    u32 out;            /* ran out of bytes (this send) */
};
/* scan[0]: the scan state of the send being looked at on this CPU. */
BPF_PERCPU_ARRAY(scan, struct scan_state, 1);
/* scan_progs[1] = skmsg_scan_more (set by skmsg.py). */
BPF_PROG_ARRAY(scan_progs, 2);

/* "traceparent:" in any case, at q (q + 12 <= end checked by the caller): letters compare with bit 5
 * set (ASCII lower case), ':' exactly. Bytes are combined so that there is one branch, not twelve:
 * the verifier keeps a pending state per branch of every loop iteration and gives up past 8192. */
static __always_inline int is_traceparent(const u8 *q) {
    u64 a = 0;
    u32 b = 0;
    __builtin_memcpy(&a, q, 8);
    __builtin_memcpy(&b, q + 8, 4);
    return ((a | 0x2020202020202020ULL) ^ 0x7261706563617274ULL /* "tracepar" */) == 0 &&
           ((b | 0x00202020U) ^ 0x3a746e65U /* "ent:" */) == 0;
}

/* Scan [st->next, st->next + CHUNK); returns 1 when the scan is over (found or out of bytes).
 * Only a '\n' needs a look: the first ends the request line; one after "\r\n\r" ends the header
 * block; one before "traceparent:" starts that header. The bytes are contiguous (pulled at once), so
 * a look back or ahead may cross a chunk's edge. One path per other byte keeps the verifier's work
 * per iteration small (it walks every iteration: 600k instructions and 1.1 s when every byte ran a
 * state machine). */
static __always_inline int scan_chunk(struct sk_msg_md *msg, volatile struct scan_state *st) {
    u32 base = st->next;
    if (base > SCAN_MAX - CHUNK)
        return 1;
    u8 *data = (u8 *)(long)msg->data;
    u8 *end = (u8 *)(long)msg->data_end;
    for (u32 i = 0; i < CHUNK; i++) {
        u32 j = base + i;
        u8 *q = data + j;
        if (q + 1 > end) {
            st->out = 1;
            return 1;
        }
        if (*q != '\n')
            continue;
        if (st->first_nl == 0)
            st->first_nl = j;
        if (j >= 3) {
            u8 *b = data + ((j - 3) & (SCAN_MAX - 1));   /* j >= 3: the mask only shows a bound */
            /* b + 3 is q: hide that, or the compiler checks q and the verifier sees b unchecked */
            asm volatile("" : "+r"(b));
            if (b + 3 <= end && ((b[0] ^ '\r') | (b[1] ^ '\n') | (b[2] ^ '\r')) == 0) {
                st->end = j + 1;
                return 1;
            }
        }
        if (q + 13 <= end && is_traceparent(q + 1)) {
            st->has_tp = 1;
            return 1;
        }
    }
    st->next = base + CHUNK;
    return st->next >= SCAN_MAX;
}

static __always_inline void hex(u8 *dst, u8 v) {
    u8 hi = v >> 4, lo = v & 0xf;
    dst[0] = hi < 10 ? '0' + hi : 'a' + hi - 10;
    dst[1] = lo < 10 ? '0' + lo : 'a' + lo - 10;
}

static __always_inline void set_result(struct tp_pending *p, u32 outcome, u32 same) {
    u64 sid = 0;
    __builtin_memcpy(&sid, p->span_id, 8);
    struct tp_result r = {.outcome = outcome, .same_thread = same};
    tp_result.update(&sid, &r);
    count(outcome);
}

/* The scan is over: insert the line after the request line, or leave the bytes alone. */
static __always_inline int finish(struct sk_msg_md *msg, struct scan_state *sp) {
    struct tp_pending p = sp->p;
    u32 same = sp->same;
    if (sp->has_tp) {
        set_result(&p, OUTCOME_EXISTING, same);
        return SK_PASS;
    }
    u32 nl = sp->first_nl;
    if (nl < 10 || sp->end == 0 || nl >= SCAN_MAX) {
        set_result(&p, OUTCOME_SPLIT, same);
        return SK_PASS;
    }
    u8 *data = (u8 *)(long)msg->data;
    u8 *end = (u8 *)(long)msg->data_end;
    u32 vs = (nl - 10) & (SCAN_MAX - 1);   /* nl >= 10: the mask only shows the verifier a bound */
    u8 *v = data + vs;
    if (v + 11 > end) {
        set_result(&p, OUTCOME_SPLIT, same);
        return SK_PASS;
    }
    /* " HTTP/1.x\r\n" ends the request line */
    if (v[0] != ' ' || v[1] != 'H' || v[2] != 'T' || v[3] != 'T' || v[4] != 'P' || v[5] != '/' ||
        v[6] != '1' || v[7] != '.' || (v[8] != '1' && v[8] != '0') || v[9] != '\r') {
        set_result(&p, OUTCOME_BAD_VERSION, same);
        return SK_PASS;
    }
    u32 at = nl + 1;
    if (bpf_msg_push_data(msg, at, TP_LINE_LEN, 0) != 0) {
        set_result(&p, OUTCOME_PUSH_FAILED, same);
        return SK_PASS;
    }
    /* after this pull, data starts at `at` */
    if (bpf_msg_pull_data(msg, at, at + TP_LINE_LEN, 0) != 0) {
        bpf_msg_pop_data(msg, at, TP_LINE_LEN, 0);   /* take the blank bytes back out */
        set_result(&p, OUTCOME_PULL_FAILED, same);
        return SK_PASS;
    }
    data = (u8 *)(long)msg->data;
    end = (u8 *)(long)msg->data_end;
    if (data + TP_LINE_LEN > end) {
        bpf_msg_pop_data(msg, at, TP_LINE_LEN, 0);
        set_result(&p, OUTCOME_PULL_FAILED, same);
        return SK_PASS;
    }
    const char head[] = "traceparent: 00-";
#pragma unroll
    for (int i = 0; i < 16; i++)
        data[i] = head[i];
#pragma unroll
    for (int i = 0; i < 16; i++)
        hex(data + 16 + 2 * i, p.trace_id[i]);
    data[48] = '-';
#pragma unroll
    for (int i = 0; i < 8; i++)
        hex(data + 49 + 2 * i, p.span_id[i]);
    data[65] = '-';
    hex(data + 66, p.flags);
    data[68] = '\r';
    data[69] = '\n';
    set_result(&p, OUTCOME_INJECTED, same);
    return SK_PASS;
}

int skmsg_scan_more(struct sk_msg_md *msg) {
    u32 z = 0;
    struct scan_state *sp = scan.lookup(&z);
    if (!sp)
        return SK_PASS;
    if (scan_chunk(msg, sp))
        return finish(msg, sp);
    scan_progs.call(msg, 1);
    set_result(&sp->p, OUTCOME_SPLIT, sp->same);   /* tail call limit reached */
    return SK_PASS;
}

int skmsg_traceparent(struct sk_msg_md *msg) {
    struct conn_key ck = {};
    u64 id = bpf_get_current_pid_tgid();
    ck.tgid = id >> 32;
    ck.lport = msg->local_port;
    ck.rport = bpf_ntohl(msg->remote_port);
    struct tp_pending *pp = tp_pending.lookup(&ck);
    if (!pp)
        return SK_PASS;          /* the common case: nothing pending for this connection */
    u32 z = 0;
    struct scan_state *sp = scan.lookup(&z);
    if (!sp)
        return SK_PASS;
    __builtin_memset(sp, 0, sizeof(*sp));
    __builtin_memcpy(&sp->p, pp, sizeof(sp->p));
    tp_pending.delete(&ck);      /* one-shot: whatever happens below, never twice */
    struct tp_pending p = sp->p;
    u32 same = p.tid == id;
    sp->same = same;
    count(same ? COUNT_SAME_THREAD : COUNT_OTHER_THREAD);

    if (bpf_ktime_get_ns() - p.ktime > FRESH_NS) {
        set_result(&p, OUTCOME_STALE, same);
        return SK_PASS;
    }
    u32 size = msg->size;
    u32 pull = size < SCAN_MAX ? size : SCAN_MAX;
    if (pull < 16 || bpf_msg_pull_data(msg, 0, pull, 0) != 0) {
        set_result(&p, OUTCOME_PULL_FAILED, same);
        return SK_PASS;
    }
    u8 *data = (u8 *)(long)msg->data;
    u8 *end = (u8 *)(long)msg->data_end;
    if (data + 16 > end) {
        set_result(&p, OUTCOME_NOT_HTTP, same);
        return SK_PASS;
    }
    /* "<method> ": the method the uprobe read from the request */
    u32 ml = p.method_len;
    if (ml == 0 || ml > 7) {
        set_result(&p, OUTCOME_NOT_HTTP, same);
        return SK_PASS;
    }
    u8 after = 0;   /* the byte after the method: must be ' ' */
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (i < ml && data[i] != (u8)p.method[i]) {
            set_result(&p, OUTCOME_NOT_HTTP, same);
            return SK_PASS;
        }
        if (i == ml)
            after = data[i];
    }
    if (after != ' ') {
        set_result(&p, OUTCOME_NOT_HTTP, same);
        return SK_PASS;
    }
    if (scan_chunk(msg, sp))
        return finish(msg, sp);
    scan_progs.call(msg, 1);
    set_result(&p, OUTCOME_SPLIT, same);   /* the tail call failed */
    return SK_PASS;
}
