"""Benchmarks (`python -m loadtests.bench`) and, later, Locust suites and soak scenarios."""
