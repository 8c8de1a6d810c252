"""The gateways' autoscaling signals: what one second of one version endpoint looks like,
how seconds from several sources add up, and where they meet the autoscaler in Redis.

A gateway worker closes each wall-clock second into a :class:`SignalRecord` per version
(:mod:`merlin_dp.gateway.signals`); the admin port sums its workers' records, Redis carries
them from many gateways (:mod:`merlin_dp.gateway.signal_push`), and the autoscaler adds
them into its windows and builds the policy's input from them alone
(:mod:`merlin_dp.autoscaler.inputs`). A simulator that wants to be fed like production
emits these records too. Every number is a sum or a time-weighted mean over the second,
so records of several workers or gateways for the same second add up key by key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict


class SignalRecord(TypedDict):
    """One version endpoint's closed second, from one gateway worker or summed over many."""

    project: str
    model: str
    version: str
    second: int  # wall-clock, whole seconds since the epoch
    requests: int  # arrivals within the second
    concurrency: float  # mean requests in flight: in service plus queued
    in_service: float  # mean requests on a replica (dispatched, not yet answered)
    queued: float  # mean requests waiting in the gateway for a replica or a free slot
    completions: int  # exchanges with a replica that ended within the second
    service_seconds: float  # their summed time from dispatch to answer


# The keys that add up when records of the same version and second are merged.
SUMMED = ("requests", "concurrency", "in_service", "queued", "completions", "service_seconds")


def merge_records(records: Iterable[SignalRecord]) -> list[SignalRecord]:
    """Records of the same version and second summed into one, oldest second first.

    Records from before the queue and service-time fields existed count them as zero.
    """
    merged: dict[tuple[str, str, str, int], SignalRecord] = {}
    for r in records:
        key = (r["project"], r["model"], r["version"], r["second"])
        into = merged.get(key)
        if into is None:
            merged[key] = {**r, **{k: r.get(k, 0) for k in SUMMED}}  # type: ignore[typeddict-item]
            continue
        for k in SUMMED:
            into[k] += r.get(k, 0)  # type: ignore[literal-required]
    return sorted(merged.values(), key=lambda r: r["second"])


def signals_stream(prefix: str = "merlin-dp") -> str:
    """The Redis stream gateways push their signals to, under a deployment's key prefix."""
    return f"{prefix}:signals"
