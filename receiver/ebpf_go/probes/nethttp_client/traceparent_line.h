/* traceparent_line.h: the decisions of the probe_write writer (traceparent_probe_write.h) that
 * need no BPF helper: the header line it writes and when a bufio.Writer has room for it.
 *
 * Plain C on purpose: tests/unit/ebpf_go/test_probe_write.py compiles this header with the host's
 * C compiler and checks every decision, the same code the BPF program runs.
 * Needs u8, u32, u64, s64 and struct trace_ctx (go_types.h) declared before it.
 */
#ifndef OTELGO_TRACEPARENT_LINE_H
#define OTELGO_TRACEPARENT_LINE_H

#define TP_LINE_LEN 70   /* "traceparent: " 13 + "00-<32 hex>-<16 hex>-<2 hex>" 55 + "\r\n" 2 */

/* Outcomes of the writer, in the client record's prop_outcome (nethttp_client.py
 * PROPAGATION_OUTCOMES; 1 and 4 mean the same as sk_msg's). */
#define PW_INJECTED 1
#define PW_EXISTING 4           /* the request's Header already has a Traceparent key */
#define PW_NO_ROOM 9            /* the buffered header lines leave fewer than 70 bytes free */
#define PW_NOT_CHECKED 10       /* Header map too large to check for Traceparent: left alone */
#define PW_WRITE_FAILED 11      /* bpf_probe_write_user failed: nothing changed */
#define PW_WRITER_STATE 12      /* the bufio.Writer holds an error or looks inconsistent */

static __always_inline char tp_hex_digit(u8 v) {
    return v < 10 ? '0' + v : 'a' + (v - 10);
}

/* `traceparent: 00-<trace>-<span>-<flags>\r\n` into out[0..TP_LINE_LEN), lower-case hex. */
static __always_inline void tp_format_line(const struct trace_ctx *tc, char *out) {
    const char head[] = "traceparent: 00-";
#pragma unroll
    for (int i = 0; i < 16; i++)
        out[i] = head[i];
#pragma unroll
    for (int i = 0; i < 16; i++) {
        out[16 + 2 * i] = tp_hex_digit(tc->trace_id[i] >> 4);
        out[17 + 2 * i] = tp_hex_digit(tc->trace_id[i] & 15);
    }
    out[48] = '-';
#pragma unroll
    for (int i = 0; i < 8; i++) {
        out[49 + 2 * i] = tp_hex_digit(tc->span_id[i] >> 4);
        out[50 + 2 * i] = tp_hex_digit(tc->span_id[i] & 15);
    }
    out[65] = '-';
    out[66] = tp_hex_digit(tc->flags >> 4);
    out[67] = tp_hex_digit(tc->flags & 15);
    out[68] = '\r';
    out[69] = '\n';
}

/* May the line go into a bufio.Writer {buf = (ptr, len, cap), n, err}? Only if the writer is
 * healthy (no sticky error, 0 <= n <= len <= cap, a buffer) and len - n >= TP_LINE_LEN: bufio fills
 * buf[n:len] and nothing beyond len, so the line is then exactly what the next Write would have
 * buffered, and Go sends it with the rest. Returns 0 (write) or the PW_* reason not to. */
static __always_inline int pw_room(u64 buf_ptr, s64 len, s64 cap, s64 n, u64 err_tab) {
    if (err_tab != 0 || buf_ptr == 0 || n < 0 || len < n || cap < len)
        return PW_WRITER_STATE;
    if (len - n < TP_LINE_LEN)
        return PW_NO_ROOM;
    return 0;
}

/* Is this Header map key "Traceparent" in any letter case? (Go canonicalizes keys set through
 * Header.Set/Add; a map written directly may hold any case, and would still be sent.) */
static __always_inline int tp_is_traceparent_key(const char *k, s64 len) {
    const char want[] = "traceparent";
    if (len != 11)
        return 0;
#pragma unroll
    for (int i = 0; i < 11; i++) {
        char c = k[i];
        if (c >= 'A' && c <= 'Z')
            c += 'a' - 'A';
        if (c != want[i])
            return 0;
    }
    return 1;
}

#endif
