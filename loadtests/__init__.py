"""Load, speed and fault testing: the benchmarks (`python -m loadtests.bench http|grpc|
shadow|convergence|autoscale`), the soak with its fault scenarios (`python -m
loadtests.soak`), the autoscaler's simulator and baselines, and the Locust suites behind
`merlin-dp loadtest`."""
