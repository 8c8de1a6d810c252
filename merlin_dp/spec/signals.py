"""Where the gateways' autoscaling signals meet the autoscaler in Redis.

Gateways append each closed second of per-version signals to one Redis stream
(:mod:`merlin_dp.gateway.signal_push`); the autoscaler reads it
(:class:`merlin_dp.autoscaler.collector.RedisSignals`). The stream's name is the contract
both sides share, so it lives here rather than in either.
"""

from __future__ import annotations


def signals_stream(prefix: str = "merlin-dp") -> str:
    """The Redis stream gateways push their signals to, under a deployment's key prefix."""
    return f"{prefix}:signals"
