"""The gateways' autoscaling signals: what one second of one version endpoint looks like,
how seconds from several sources add up, and where they meet the autoscaler in Redis.

A gateway worker closes each wall-clock second into a :class:`SignalRecord` per version
(:mod:`merlin_dp.gateway.signals`); the admin port sums its workers' records, Redis carries
them from many gateways (:mod:`merlin_dp.gateway.signal_push`), and the autoscaler adds
them into its windows and builds the policy's input from them alone
(:mod:`merlin_dp.autoscaler.inputs`). A simulator that wants to be fed like production
emits these records too. Every number is a sum or a time-weighted mean over the second,
so records of several workers or gateways for the same second add up key by key.

The same records carry what a rollout is judged on (:mod:`merlin_dp.rollout`): the
version's answers, server errors and latency histogram, and, for a version mirrored to,
its shadow copies' and how their answers compared.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NotRequired, TypedDict

# Latency histogram bounds (seconds) of every per-version histogram the gateway keeps:
# its Prometheus buckets and the records' ``latency`` lists (one count per bound, then
# one for answers slower than the last).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip

# gRPC status codes that are the server's fault, not the caller's (a caller's bad
# argument or cancel is not a regression of the version that answered it).
GRPC_SERVER_FAULTS = frozenset({2, 4, 8, 12, 13, 14, 15})  # UNKNOWN DEADLINE_EXCEEDED
# RESOURCE_EXHAUSTED UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS


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
    # What a rollout is judged on; absent when nothing of the kind happened that second.
    answered: NotRequired[int]  # answers callers got (any status)
    errors: NotRequired[int]  # of those, server errors: 5xx, or a gRPC server fault
    latency: NotRequired[list[int]]  # those answers per LATENCY_BUCKETS bucket
    shadow_answered: NotRequired[int]  # mirrored copies sent to this version that ended
    shadow_errors: NotRequired[int]  # of those, a server error or no answer
    shadow_latency: NotRequired[list[int]]  # the answered copies per bucket
    compared: NotRequired[int]  # copies compared with the primary's answer, neither an error
    differed: NotRequired[int]  # of those, status or body differed


# The keys that add up when records of the same version and second are merged.
SUMMED = ("requests", "concurrency", "in_service", "queued", "completions", "service_seconds")
# The same, for keys a record may lack; lists add up bucket by bucket.
OPTIONAL_COUNTS = ("answered", "errors", "shadow_answered", "shadow_errors", "compared",
                   "differed")  # fmt: skip
HISTOGRAMS = ("latency", "shadow_latency")


def merge_records(records: Iterable[SignalRecord]) -> list[SignalRecord]:
    """Records of the same version and second summed into one, oldest second first.

    Records from before the queue and service-time fields existed count them as zero.
    """
    merged: dict[tuple[str, str, str, int], SignalRecord] = {}
    for r in records:
        key = (r["project"], r["model"], r["version"], r["second"])
        into = merged.get(key)
        if into is None:
            first: SignalRecord = {**r, **{k: r.get(k, 0) for k in SUMMED}}  # type: ignore[typeddict-item]
            for k in HISTOGRAMS:
                if k in r:
                    first[k] = list(r[k])  # type: ignore[literal-required]
            merged[key] = first
            continue
        add_record(into, r)
    return sorted(merged.values(), key=lambda r: r["second"])


def add_record(into: SignalRecord, r: SignalRecord) -> None:
    """Add ``r``'s numbers into ``into`` (the same version and second)."""
    for k in SUMMED:
        into[k] += r.get(k, 0)  # type: ignore[literal-required]
    for k in OPTIONAL_COUNTS:
        if k in r:
            into[k] = into.get(k, 0) + r[k]  # type: ignore[literal-required]
    for k in HISTOGRAMS:
        counts: list[int] | None = r.get(k)  # type: ignore[assignment]
        if counts:
            mine: list[int] | None = into.get(k)  # type: ignore[assignment]
            if mine is None:
                into[k] = list(counts)  # type: ignore[literal-required]
            else:
                into[k] = add_counts(mine, counts)  # type: ignore[literal-required]


def add_counts(a: list[int], b: list[int]) -> list[int]:
    """Two histograms (or count lists) added bucket by bucket."""
    if len(a) < len(b):
        a, b = b, a
    return [x + (b[i] if i < len(b) else 0) for i, x in enumerate(a)]


def signals_stream(prefix: str = "merlin-dp") -> str:
    """The Redis stream gateways push their signals to, under a deployment's key prefix."""
    return f"{prefix}:signals"
