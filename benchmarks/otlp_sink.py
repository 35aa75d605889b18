"""An OTLP/gRPC sink for the pipeline benchmarks: a child process that answers TraceService/Export
and counts the spans it received, pinned to one core (the core the measured collector does not use).

    count = mp.Value("q", 0); port_q = mp.Queue()
    mp.Process(target=sink_main, args=(port_q, count), kwargs={"cpu": 0}, daemon=True).start()
    port = port_q.get(timeout=30)      # then point an otlp exporter at 127.0.0.1:<port>; count.value
"""

from __future__ import annotations

import os
from typing import Any


def sink_main(port_q: Any, count: Any, cpu: int = 0) -> None:
    """OTLP/gRPC sink on `cpu`: counts spans in `count` (an mp.Value), puts its port on `port_q`."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    os.sched_setaffinity(0, {cpu})

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with count.get_lock():
                count.value += n
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 256 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()
