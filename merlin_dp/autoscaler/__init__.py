"""The autoscaler: signals, windows, policies and actuation.

`collector` (the gateways' per-second signals, pulled or read from Redis), `window`
(per-second buckets), `resources` (replicas' CPU and memory from their `/metrics`),
`policy` (the decisions as pure functions: KPA for rps and concurrency, HPA for
utilization), `metrics` (its Prometheus text) and `scaler` (the loop that ties them to a
runtime). The simulator that drives the same policy is `loadtests/autoscale_sim.py`.
"""
