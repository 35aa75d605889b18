/* netaddr.h: the IP and port of a Go net.Addr holding a *net.TCPAddr, read from user memory.
 *
 * Needs -D TCPADDR_IP_POS, TCPADDR_PORT_POS (net.TCPAddr.IP, .Port) and ITAB_TCPADDR, the address of
 * the itab (*net.TCPAddr, net.Addr) or 0 when unknown (stripped or PIE): then the value is checked
 * for shape only (an IP of 4 or 16 bytes, a port in 0..65535), so that another net.Addr (a unix
 * socket's) gives no address rather than a wrong one. */
#ifndef OTELGO_NETADDR_H
#define OTELGO_NETADDR_H

struct addr {
    u8 ip[16];
    u16 port;
    u8 ip_len;             /* 4, 16, or 0: unknown */
    u8 pad[5];
};

/* The address of net.Addr interface value `a` into `out` (left zero if unknown). */
static __always_inline void read_tcpaddr(struct go_iface a, struct addr *out) {
    if (a.data == 0 || (ITAB_TCPADDR != 0 && a.tab != ITAB_TCPADDR))
        return;
    struct {
        struct go_slice ip;  /* TCPADDR_IP_POS, then Port at TCPADDR_PORT_POS */
        s64 port;
    } t = {};
    if (TCPADDR_IP_POS != 0 || TCPADDR_PORT_POS != 24) {
        if (bpf_probe_read_user(&t.ip, sizeof(t.ip), (void *)(a.data + TCPADDR_IP_POS)) != 0 ||
            bpf_probe_read_user(&t.port, sizeof(t.port), (void *)(a.data + TCPADDR_PORT_POS)) != 0)
            return;
    } else if (bpf_probe_read_user(&t, sizeof(t), (void *)a.data) != 0) {   /* IP and Port in one read */
        return;
    }
    if (t.port < 0 || t.port > 65535 || t.ip.ptr == 0)
        return;
    if (t.ip.len == 4) {
        if (bpf_probe_read_user(out->ip, 4, (void *)t.ip.ptr) == 0)
            out->ip_len = 4;
    } else if (t.ip.len == 16) {
        if (bpf_probe_read_user(out->ip, 16, (void *)t.ip.ptr) == 0)
            out->ip_len = 16;
    }
    if (out->ip_len)
        out->port = t.port;
}

/* A connection's two ends as the transport holds them: two adjacent net.Addr fields, remote first
 * (grpc's http2Server/http2Client remoteAddr, localAddr; peer.Addr, LocalAddr), read in one go. */
struct conn_ifaces {
    struct go_iface remote;
    struct go_iface local;
};

/* What a connection's addresses resolved to, cached per transport: valid while the transport still
 * points at the same two net.Addr objects (a transport freed and reused for another connection
 * holds new ones), so that a call costs one read of the two interfaces instead of six. */
struct conn_addrs {
    u64 remote_data;
    u64 local_data;
    struct addr remote;
    struct addr local;
};

struct conn_key {
    u64 transport;
    u32 tgid;
    u32 pad;
};

/* The connection's ends: `cached` (the cache's entry for the transport, or NULL) while it still
 * matches the interfaces `ci` read now, else resolved into `scratch`, and *fresh set: the caller then
 * updates the cache with it (BCC rewrites map calls only in the .c file, so the lookup and the update
 * stay there). NULL when there is neither. */
static __always_inline struct conn_addrs *conn_addrs_of(struct conn_ifaces *ci, struct conn_addrs *cached,
                                                        struct conn_addrs *scratch, int *fresh) {
    *fresh = 0;
    if (cached && cached->remote_data == ci->remote.data && cached->local_data == ci->local.data)
        return cached;
    if (!scratch)
        return 0;
    __builtin_memset(scratch, 0, sizeof(*scratch));
    scratch->remote_data = ci->remote.data;
    scratch->local_data = ci->local.data;
    read_tcpaddr(ci->remote, &scratch->remote);
    read_tcpaddr(ci->local, &scratch->local);
    *fresh = 1;
    return scratch;
}

#endif
