/* record.h: how every probe hands its records to user space.
 *
 * Each probe is its own program, so the names are the same in all of them:
 *   events     ring buffer of records (struct <probe>_event, each starting with event_header) ->
 *              the receiver's copier (ringbuf.py), decoded by the probe's declared Record;
 *   lost[0]    records dropped because the ring buffer was full -> otelgo_ebpf_events_lost;
 *   unsampled[0] records not written: their trace is not sampled (SAMPLED, go_types.h) ->
 *              otelgo_ebpf_sampler_spans{decision="unsampled"};
 *   submitted  per CPU: records submitted; every WAKEUP_EVERY-th wakes the reader, which otherwise
 *              drains on its own timer (no wake-up cost on the traced thread for most records).
 * A .c file reserves with `events.ringbuf_reserve`, counts a failure with `count_lost(lost.lookup(&z))`
 * and submits with `events.ringbuf_submit(e, wakeup_flags(submitted.lookup(&z)))` (BCC rewrites map
 * calls only in the .c file). After its record struct it writes `RECORD_ASSERTS;`: the layout the
 * Python declaration (probes/spec.py Record) passes as -DRECORD_ASSERTS, offset and size of every
 * field, so that the two sides cannot drift apart. */
#ifndef OTELGO_RECORD_H
#define OTELGO_RECORD_H

#ifndef RECORD_ASSERTS
#error "RECORD_ASSERTS is not set: build the flags with the probe's declaration (Probe.cflags in probes/spec.py)"
#endif
#ifndef WAKEUP_EVERY
#define WAKEUP_EVERY 32
#endif

#define EVENT_KIND_HTTP_SERVER 1
#define EVENT_KIND_HTTP_CLIENT 2
#define EVENT_KIND_DATABASE_SQL 3
#define EVENT_KIND_GRPC_SERVER 4
#define EVENT_KIND_GRPC_CLIENT 5
#define EVENT_KIND_FUNCTION 6

/* Every ring-buffer record starts with this header (spec.py HEADER). */
struct event_header {
    u32 kind;      /* EVENT_KIND_* */
    u32 tgid;
    u64 start_ns;  /* bpf_ktime_get_ns (CLOCK_MONOTONIC) at entry */
    u64 end_ns;    /* at the end */
    u64 goroutine;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(lost, u64, 1);
BPF_ARRAY(unsampled, u64, 1);
BPF_PERCPU_ARRAY(submitted, u64, 1);

static __always_inline void count_lost(u64 *lost_count) {
    if (lost_count)
        __sync_fetch_and_add(lost_count, 1);
}

static __always_inline u64 wakeup_flags(u64 *submitted_count) {
    if (submitted_count && (++*submitted_count % WAKEUP_EVERY) == 0)
        return BPF_RB_FORCE_WAKEUP;
    return BPF_RB_NO_WAKEUP;
}

#endif
