"""Load, speed and fault testing, beside the package and not installed. One room per job:

- :mod:`loadtests.harness`: what every job here stands on (and the tests' real processes
  too): child processes, ports, the load generators, measuring, Prometheus text, route
  tables, and the systems started under and around the load (nginx, the gateway, the
  controller, redis-server);
- :mod:`loadtests.bench`: the benchmarks, ``python -m loadtests.bench
  http|grpc|shadow|convergence|autoscale``, a module each;
- :mod:`loadtests.soak`: the soak, ``python -m loadtests.soak``, a module per fault
  scenario;
- :mod:`loadtests.autoscale_sim` and :mod:`loadtests.autoscale_baselines`: the
  autoscaler's simulator and the autoscalers it measures ours against (KPA, HPA, an
  oracle), which the autoscale benchmark runs.

The Locust suites behind ``merlin-dp loadtest`` ship with the package, in
``merlin_dp/loadtest/``.
"""
