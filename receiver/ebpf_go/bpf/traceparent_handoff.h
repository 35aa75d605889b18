/* traceparent_handoff.h: the records the client uprobe (nethttp_client.c) hands to the sk_msg
 * program (skmsg_traceparent.c) through maps pinned under PIN_DIR. One definition for both sides:
 * the two programs are compiled separately and must agree on these layouts byte for byte. */
#ifndef OTELGO_TRACEPARENT_HANDOFF_H
#define OTELGO_TRACEPARENT_HANDOFF_H

/* Connection of a pending request: the sending process and both TCP ports (host order). */
struct conn_key {
    u32 tgid;
    u16 lport;
    u16 rport;
};

/* Left by the uprobe at `net/http.(*Request).write` entry, consumed by sk_msg (one-shot). */
struct tp_pending {
    u8 trace_id[16];
    u8 span_id[8];
    u8 flags;
    u8 method_len;
    u8 pad[6];
    char method[8];
    u64 ktime;                  /* bpf_ktime_get_ns when the uprobe stored it */
    u64 tid;                    /* bpf_get_current_pid_tgid of the writing thread */
};

/* What happened to one client span's request; read by the client RET probe (by span id). */
struct tp_result {
    u32 outcome;                /* OUTCOME_* in skmsg_traceparent.c */
    u32 same_thread;            /* 1 if the sk_msg ran on the thread that ran the uprobe */
};

#endif
