/* traceparent_probe_write.h: propagation mode probe_write. Writes the `traceparent` header line
 * into the outgoing HTTP/1.x request in the Go process's own memory, as the public Go tracers do,
 * with our checks. Included by nethttp_client.c only when compiled with PROBE_WRITE=1: a program
 * that calls bpf_probe_write_user does not even load under kernel lockdown, so the sk_msg and
 * stitch modes never contain it.
 *
 * Where: `net/http.Header.writeSubset(h, w io.Writer, exclude, trace)` entry, the call
 * `(*Request).write` makes for the request's own Header, on the transport's writeLoop goroutine.
 * By then the request line, Host, User-Agent and the length headers are in w, a *bufio.Writer
 * (persistConn.bw: 4 KiB, not yet flushed unless the headers before are that long), and the
 * Header's lines are not. The line goes at buf[n:n+70] and n += 70: exactly what the next Write
 * would have buffered, so Go sends it with the rest, and nothing is allocated.
 *
 * Written only if all hold, else the request goes unchanged and the reason is recorded (PW_*):
 *   - this goroutine's `(*Request).write` for a request of a traced roundTrip armed it (pw_armed),
 *     h is that request's Header map and w that call's writer (a server's response headers, the
 *     extraHeaders call, another goroutine's writer can never match); one shot;
 *   - w's itab is *bufio.Writer's (when the binary's itab address is known: non-PIE);
 *   - the Header map has no "Traceparent" key (any case). Maps of up to 8 keys are checked (one
 *     swiss group, or one classic bucket with no overflow and no growth in progress); bigger ones
 *     are left alone (PW_NOT_CHECKED): the stitcher still joins those on this host;
 *   - the writer has no sticky error and len(buf) - n >= 70 (pw_room, traceparent_line.h).
 * The line is written before n: if the second write fails, the bytes past n are never sent.
 *
 * This header holds the map-free parts; the map pw_armed and the program
 * uprobe_client_writeSubset are in nethttp_client.c under `#if PROBE_WRITE` (BCC rewrites map
 * calls only in the main file).
 *
 * Constants (-D, nethttp_client.cflags(probe_write=True)): BUFIO_ERR_POS, BUFIO_BUF_POS,
 * BUFIO_N_POS, ITAB_BUFIOWRITER (0: unknown, not checked), SWISS_MAPS, SWISS_DIRPTR_POS,
 * SWISS_DIRLEN_POS, HMAP_B_POS, HMAP_BUCKETS_POS, HMAP_OLDBUCKETS_POS.
 */
#ifndef OTELGO_TRACEPARENT_PROBE_WRITE_H
#define OTELGO_TRACEPARENT_PROBE_WRITE_H

#include "traceparent_line.h"

/* The two writes. PW_VERIFY_ONLY (tests only) turns each into a read of the same user address into
 * the same buffer: the same program for the verifier minus helper 36, so it can be load-tested on a
 * kernel that refuses bpf_probe_write_user. Never set it in a collector. */
#ifdef PW_VERIFY_ONLY
#define PW_WRITE_USER(dst, src, n) bpf_probe_read_user((void *)(src), (n), (void *)(dst))
#else
#define PW_WRITE_USER(dst, src, n) bpf_probe_write_user((void *)(dst), (src), (n))
#endif

#define PW_SLOTS 8                              /* keys in one swiss group or classic bucket */
#define SWISS_SLOT_SIZE (16 + 24)               /* map[string][]string: key, elem */
#define CLASSIC_OVERFLOW_POS (8 + 8 * 16 + 8 * 24)

/* 1 if the key at `key_at` (a Go string header) is Traceparent in any case. */
static __always_inline int pw_key_is_tp(u64 key_at) {
    struct go_string s = {};
    char k[11] = {};
    if (bpf_probe_read_user(&s, sizeof(s), (void *)key_at) != 0 || s.len != 11 || s.ptr == 0)
        return 0;
    if (bpf_probe_read_user(k, sizeof(k), (void *)s.ptr) != 0)
        return 0;
    return tp_is_traceparent_key(k, 11);
}

/* 0 if the Header map m has no Traceparent key, PW_EXISTING if it has, PW_NOT_CHECKED if it is
 * too large to tell here. */
static __always_inline int pw_check_header(u64 m) {
    u64 count = 0;
    if (m == 0)
        return 0;
    bpf_probe_read_user(&count, sizeof(count), (void *)m);   /* swiss used / classic count, @0 */
    if (count == 0)
        return 0;
    if (count > PW_SLOTS)
        return PW_NOT_CHECKED;
#if SWISS_MAPS
    u64 dir_ptr = 0;
    s64 dir_len = 0;
    u64 ctrl = 0;
    bpf_probe_read_user(&dir_ptr, sizeof(dir_ptr), (void *)(m + SWISS_DIRPTR_POS));
    bpf_probe_read_user(&dir_len, sizeof(dir_len), (void *)(m + SWISS_DIRLEN_POS));
    if (dir_len != 0 || dir_ptr == 0)
        return PW_NOT_CHECKED;                    /* not a small map: one group only here */
    if (bpf_probe_read_user(&ctrl, sizeof(ctrl), (void *)dir_ptr) != 0)
        return PW_NOT_CHECKED;
#pragma unroll
    for (int i = 0; i < PW_SLOTS; i++) {
        u8 c = (ctrl >> (8 * i)) & 0xff;
        if ((c & 0x80) == 0 && pw_key_is_tp(dir_ptr + 8 + i * SWISS_SLOT_SIZE))
            return PW_EXISTING;
    }
#else
    u8 b = 0;
    u64 buckets = 0, old = 0, overflow = 0;
    u8 tophash[PW_SLOTS] = {};
    bpf_probe_read_user(&b, sizeof(b), (void *)(m + HMAP_B_POS));
    bpf_probe_read_user(&buckets, sizeof(buckets), (void *)(m + HMAP_BUCKETS_POS));
    bpf_probe_read_user(&old, sizeof(old), (void *)(m + HMAP_OLDBUCKETS_POS));
    if (b != 0 || old != 0 || buckets == 0)
        return PW_NOT_CHECKED;
    bpf_probe_read_user(&overflow, sizeof(overflow), (void *)(buckets + CLASSIC_OVERFLOW_POS));
    if (overflow != 0 || bpf_probe_read_user(tophash, sizeof(tophash), (void *)buckets) != 0)
        return PW_NOT_CHECKED;
#pragma unroll
    for (int i = 0; i < PW_SLOTS; i++) {
        if (tophash[i] >= 5 && pw_key_is_tp(buckets + 8 + i * 16))   /* minTopHash: a filled slot */
            return PW_EXISTING;
    }
#endif
    return 0;
}

#endif
