"""One module per instrumented library: which symbols it hooks, the -D constants of its BPF file in
bpf/, how it attaches, and how its ring-buffer records become spans.

- nethttp_server: `net/http.serverHandler.ServeHTTP` -> SERVER spans (bpf/nethttp_server.c)
- nethttp_client: `net/http.(*Transport).roundTrip` -> CLIENT spans (bpf/nethttp_client.c)
- database_sql: `database/sql` query/exec -> CLIENT spans (bpf/database_sql.c)
"""
