"""`make bench`: the service against a bare grpc.aio echo baseline, on a fresh, seeded database.

`python -m tests.bench --help` lists the options; the modules are:
seed (database, COPY seeding), procs (subprocesses, CPU and RSS from /proc), echo (the baseline server),
h2load (fixed-body gRPC load), loadgen (multi-process Python clients), rawsql (the single-row UPDATE loop),
report (table and JSON) and harness (the cases).
"""
