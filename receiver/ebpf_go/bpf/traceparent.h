/* traceparent.h: parse a W3C `traceparent` value, "vv-<32 hex trace id>-<16 hex parent id>-<2 hex
 * flags>" (lowercase hex), into a trace_ctx (go_types.h). Shared by the probes that continue an
 * incoming trace: the net/http server (from the request's header map) and the gRPC server (from the
 * decoded HTTP/2 header fields). */
#ifndef OTELGO_TRACEPARENT_H
#define OTELGO_TRACEPARENT_H

#define TRACEPARENT_LEN 55   /* version 00 */

static __always_inline int hexval(char ch) {
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;
}

static __always_inline int parse_hex(const char *src, u8 *dst, int nbytes) {
    u8 any = 0;
    for (int i = 0; i < 16; i++) {
        if (i >= nbytes)
            break;
        int hi = hexval(src[2 * i]), lo = hexval(src[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        dst[i] = (hi << 4) | lo;
        any |= dst[i];
    }
    return any ? 0 : -1;   /* all-zero ids are invalid */
}

/* s: at least 55 readable bytes (BPF memory), len: the value's length. 0 and tc's trace id, parent
 * span id, flags and remote_parent set; -1 when the value is not a valid traceparent. */
static __always_inline int parse_traceparent_value(const char *s, u32 len, struct trace_ctx *tc) {
    if (len < TRACEPARENT_LEN)
        return -1;
    if (s[2] != '-' || s[35] != '-' || s[52] != '-')
        return -1;
    u8 ver = 0;
    if (parse_hex(s, &ver, 1) < 0 && !(s[0] == '0' && s[1] == '0'))
        return -1;
    if (ver == 0xff || (ver == 0 && len != TRACEPARENT_LEN))
        return -1;
    if (parse_hex(s + 3, tc->trace_id, 16) < 0 || parse_hex(s + 36, tc->parent_span_id, 8) < 0)
        return -1;
    int hi = hexval(s[53]), lo = hexval(s[54]);
    if (hi < 0 || lo < 0)
        return -1;
    tc->flags = (hi << 4) | lo;
    tc->remote_parent = 1;
    return 0;
}

#endif
