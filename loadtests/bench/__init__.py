"""The benchmarks, ``python -m loadtests.bench http|grpc|shadow|convergence|autoscale``.

Those that compare the gateway with a native reference on this machine (http, grpc,
shadow) follow the layout in ``shared/BENCHMARKING.md``: the upstream and the load
generator pinned to one CPU, the system under test (the reference or the gateway, one
worker) pinned to the other, interleaved rounds, per-round ratios and their medians, CPU
time per request of the system under test read from ``/proc/<pid>/stat``, and a noise
guard that calls a run inconclusive (a warning, never a failure). Each ends with a
``RESULT <benchmark> ...`` line.

One module per benchmark, each with its subcommand's options (``add_parser``):

- :mod:`~loadtests.bench.http`: nginx ``proxy_pass`` against the gateway over HTTP/1.1;
- :mod:`~loadtests.bench.grpc`: nginx ``grpc_pass`` and a ``grpc.aio`` pass-through
  against the gateway's gRPC port, in front of :mod:`~loadtests.bench.grpc_servers`;
- :mod:`~loadtests.bench.shadow`: the gateway without and with a 100% mirror;
- :mod:`~loadtests.bench.convergence`: time from a route change until every gateway
  serves it, through the controller's stream and through Redis;
- :mod:`~loadtests.bench.autoscale`: the autoscaler's policy against KPA, the HPA and an
  oracle in :mod:`loadtests.autoscale_sim`;

and :mod:`~loadtests.bench.options` (options they share), :mod:`~loadtests.bench.cli`
(the command line). Processes, ports, load generators and measuring come from
:mod:`loadtests.harness`.

They are benchmarks, not tests: they report numbers and assert nothing about them. All
traffic goes to 127.0.0.1, every run is bounded in time, and every process they start is
stopped in a ``finally`` (Ctrl-C and SIGTERM included).
"""
