"""The harness the load jobs here stand on: the benchmarks (:mod:`loadtests.bench`), the
soak (:mod:`loadtests.soak`) and the tests' real processes (``tests/conftest.py``).

One module per job:

- :mod:`~loadtests.harness.errors`: :class:`HarnessError`, raised by any step that cannot
  run (a benchmark's or the soak's error, never a measurement);
- :mod:`~loadtests.harness.tools`: finding nginx, wrk, h2load and redis-server, installing
  their Debian packages when missing;
- :mod:`~loadtests.harness.procfs`: what ``/proc`` says about a process: its stat fields,
  memory, command line, environment, and the process tree;
- :mod:`~loadtests.harness.processes`: a child process started in its own session (pinned
  to CPUs with taskset when asked), its log and what to say when it fails, stopping it and
  whatever it left behind;
- :mod:`~loadtests.harness.ports`: waiting until a port accepts connections or answers
  HTTP 200 (free ports come from :mod:`merlin_dp.common.net`);
- :mod:`~loadtests.harness.loadgen`: wrk and h2load, running them and parsing their
  reports, and driving a target with them while its CPU time is read;
- :mod:`~loadtests.harness.measure`: CPU seconds of a process tree, medians, spreads and
  percentiles, and the noise guard's limits;
- :mod:`~loadtests.harness.prometheus`: parsing Prometheus text and reading ``/metrics``;
- :mod:`~loadtests.harness.routes`: route tables and rules written to a gateway's route
  file;
- :mod:`~loadtests.harness.systems`: what runs under and around the load: nginx (a fixed
  upstream, an HTTP proxy, a gRPC proxy), merlin-dp's gateway and controller, redis-server;
- :mod:`~loadtests.harness.tables`: the plain-text tables the benchmarks print.
"""
