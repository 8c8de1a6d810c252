"""Gateway counters: cheap to record on the hot path, mergeable across workers.

The hot path bumps plain slot attributes on objects it already holds (a version's
:class:`VersionStats` hangs off the route table), so recording a request costs a dict
lookup by status code, a bisect and a few additions, and no lock. A worker exports its
counters as a :class:`~merlin_dp.gateway.metrics_snapshot.Snapshot` (a JSON object);
the admin port merges the snapshots of every worker and renders them in the Prometheus
text format (:mod:`merlin_dp.gateway.exposition`), so ``/metrics`` is correct whether
one process or N serve the traffic port.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TypeVar

from merlin_dp.gateway.metrics_snapshot import (
    ActivationRecord,
    MirrorRecord,
    SeriesRecord,
    Snapshot,
    VersionRecord,
)
from merlin_dp.gateway.pool.upstream import UpstreamStats
from merlin_dp.spec.signals import LATENCY_BUCKETS

# How a version was chosen: a metric label, and the index into VersionStats.by_choice.
CHOSEN_BY = ("weight", "direct", "match", "sticky")
CHOSEN_WEIGHT = 0
CHOSEN_DIRECT = 1
CHOSEN_MATCH = 2
CHOSEN_STICKY = 3

PerVersion = TypeVar("PerVersion")


# Waiting for a replica to start from zero: from a fast local process to a slow image pull.
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


# The unrouted status counted for a request on the wrong front. An HTTP request for a
# UPI_V1 (gRPC) endpoint gets 400, as gRPC servers answer HTTP/1.1 themselves (grpc-go:
# "gRPC requires HTTP/2"): no retry or other replica can serve it as sent. Not 426, which
# promises an Upgrade on this same connection (we have none), nor 421, which tells
# clients to retry on another connection. The gRPC front counts its refusals alike.
WRONG_PROTOCOL = 400


class CodeStats:
    """One series' observations: how many, their sum, and a count per bucket."""

    __slots__ = ("bounds", "buckets", "count", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        self.buckets[bisect_left(self.bounds, seconds)] += 1


class VersionStats:
    """Per version endpoint: in-flight requests and latency by (chosen_by, code)."""

    __slots__ = ("arrivals", "by_choice", "grpc_by_choice", "in_flight", "model", "project",
                 "queued", "served", "service_seconds", "version")  # fmt: skip

    def __init__(self, project: str, model: str, version: str) -> None:
        self.project = project
        self.model = model
        self.version = version
        self.in_flight = 0
        # For the autoscaler's per-second signals (merlin_dp.gateway.signals):
        self.arrivals = 0  # requests started
        self.queued = 0  # of those in flight, waiting in the version's queue now
        self.served = 0  # exchanges with a replica that ended
        self.service_seconds = 0.0  # their summed time from dispatch to answer
        self.by_choice: tuple[dict[int, CodeStats], ...] = tuple({} for _ in CHOSEN_BY)
        # gRPC calls by grpc-status (their HTTP status is always 200).
        self.grpc_by_choice: tuple[dict[int, CodeStats], ...] = tuple({} for _ in CHOSEN_BY)

    def record(self, chosen: int, code: int, seconds: float) -> None:
        series = self.by_choice[chosen]
        stats = series.get(code)
        if stats is None:
            stats = series[code] = CodeStats()
        stats.observe(seconds)

    def record_grpc(self, chosen: int, grpc_code: int, seconds: float) -> None:
        series = self.grpc_by_choice[chosen]
        stats = series.get(grpc_code)
        if stats is None:
            stats = series[grpc_code] = CodeStats()
        stats.observe(seconds)


class MirrorStats:
    """Per version endpoint mirrored to: copies by result, comparisons, latency."""

    __slots__ = ("compared", "differed", "error_pairs", "latency", "mismatch", "model",
                 "project", "results", "server_errors", "version")  # fmt: skip

    def __init__(self, project: str, model: str, version: str) -> None:
        self.project = project
        self.model = model
        self.version = version
        self.results: dict[str, int] = {}  # "sent|", "dropped|concurrency", "error|timeout"
        self.compared = 0
        self.mismatch: dict[str, int] = {}  # status | body
        self.latency = CodeStats()
        # For rollouts (merlin_dp.gateway.signals): copies answered with a server error;
        # compared pairs where either side was one (judged as errors, not as answers);
        # and, of the other pairs, those that differed.
        self.server_errors = 0
        self.error_pairs = 0
        self.differed = 0

    def compared_pair(self, server_error: bool, status_differs: bool, body_differs: bool) -> None:
        self.compared += 1
        if status_differs:
            self.mismatch["status"] = self.mismatch.get("status", 0) + 1
        elif body_differs:
            self.mismatch["body"] = self.mismatch.get("body", 0) + 1
        if server_error:
            self.error_pairs += 1
        elif status_differs or body_differs:
            self.differed += 1

    def count(self, result: str, reason: str) -> None:
        key = f"{result}|{reason}"
        self.results[key] = self.results.get(key, 0) + 1


class ActivationStats:
    """Per version endpoint: requests held while it started from zero, and how long, and
    requests that waited for a free slot."""

    __slots__ = ("cold_start", "held", "model", "overflow", "poke_errors", "pokes",
                 "project", "queued", "timed_out", "version")  # fmt: skip

    def __init__(self, project: str, model: str, version: str) -> None:
        self.project = project
        self.model = model
        self.version = version
        self.held = 0
        self.queued = 0  # waited for a free slot: every ready replica was at its limit
        self.overflow = 0  # refused: the queue was full
        self.timed_out = 0  # refused: no replica before the deadline (or version removed)
        self.pokes = 0
        self.poke_errors = 0
        self.cold_start = CodeStats(COLD_START_BUCKETS)


class ConnectionStats:
    """Client connections of one worker: open now, and those cut for abuse."""

    __slots__ = ("head_timeouts", "open", "refused")

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0  # over --max-connections: answered 503 and closed
        self.head_timeouts = 0  # request head not whole within --header-timeout: 408


class GatewayMetrics:
    """Every counter of one gateway worker."""

    def __init__(self, upstream: UpstreamStats) -> None:
        self.upstream = upstream
        self._versions: dict[tuple[str, str, str], VersionStats] = {}
        self._mirrors: dict[tuple[str, str, str], MirrorStats] = {}
        self._activations: dict[tuple[str, str, str], ActivationStats] = {}
        self.connections = ConnectionStats()
        self.unrouted: dict[int, int] = {}  # requests answered before a version was chosen
        self.table_revision = -1
        self.table_errors = 0

    def version(self, project: str, model: str, version: str) -> VersionStats:
        return _per_version(self._versions, VersionStats, project, model, version)

    def versions(self) -> Iterable[VersionStats]:
        return self._versions.values()

    def mirrors(self) -> Iterable[MirrorStats]:
        return self._mirrors.values()

    def mirror(self, project: str, model: str, version: str) -> MirrorStats:
        return _per_version(self._mirrors, MirrorStats, project, model, version)

    def activation(self, project: str, model: str, version: str) -> ActivationStats:
        return _per_version(self._activations, ActivationStats, project, model, version)

    def count_unrouted(self, code: int) -> None:
        self.unrouted[code] = self.unrouted.get(code, 0) + 1

    def snapshot(self, source_connected: bool = True) -> Snapshot:
        """Every counter, as the JSON object workers report (keys in wire order)."""
        versions: list[VersionRecord] = []
        for vs in self._versions.values():
            series = [
                _series_record(CHOSEN_BY[i], code, cs)
                for i, by_code in enumerate(vs.by_choice)
                for code, cs in by_code.items()
            ]
            # gRPC calls are HTTP 200s; their status is the grpc_code.
            series += [
                _grpc_series_record(CHOSEN_BY[i], grpc_code, cs)
                for i, by_code in enumerate(vs.grpc_by_choice)
                for grpc_code, cs in by_code.items()
            ]
            versions.append(
                {
                    "project": vs.project,
                    "model": vs.model,
                    "version": vs.version,
                    "in_flight": vs.in_flight,
                    "series": series,
                }
            )
        mirrors: list[MirrorRecord] = [
            {
                "project": m.project,
                "model": m.model,
                "version": m.version,
                "results": dict(m.results),
                "compared": m.compared,
                "mismatch": dict(m.mismatch),
                "count": m.latency.count,
                "sum": m.latency.total,
                "buckets": list(m.latency.buckets),
            }
            for m in self._mirrors.values()
        ]
        activations: list[ActivationRecord] = [
            {
                "project": a.project,
                "model": a.model,
                "version": a.version,
                "held": a.held,
                "queued": a.queued,
                "overflow": a.overflow,
                "timed_out": a.timed_out,
                "pokes": a.pokes,
                "poke_errors": a.poke_errors,
                "count": a.cold_start.count,
                "sum": a.cold_start.total,
                "buckets": list(a.cold_start.buckets),
            }
            for a in self._activations.values()
        ]
        up = self.upstream
        return {
            "versions": versions,
            "shadows": mirrors,
            "activations": activations,
            "unrouted": {str(k): v for k, v in self.unrouted.items()},
            "upstream": {
                "connects": up.connects,
                "ejections": up.ejections,
                "retries": up.retries,
                "errors": dict(up.errors),
            },
            "connections": {
                "open": self.connections.open,
                "refused": self.connections.refused,
                "head_timeouts": self.connections.head_timeouts,
            },
            "table": {
                "revision": self.table_revision,
                "errors": self.table_errors,
                "source_connected": int(source_connected),
            },
        }


def _per_version(
    store: dict[tuple[str, str, str], PerVersion],
    make: Callable[[str, str, str], PerVersion],
    project: str,
    model: str,
    version: str,
) -> PerVersion:
    """The counters of one version endpoint, made on first use (they outlive tables)."""
    key = (project, model, version)
    stats = store.get(key)
    if stats is None:
        stats = store[key] = make(project, model, version)
    return stats


def _series_record(chosen_by: str, code: int, cs: CodeStats) -> SeriesRecord:
    return {
        "chosen_by": chosen_by,
        "code": code,
        "count": cs.count,
        "sum": cs.total,
        "buckets": list(cs.buckets),
    }


def _grpc_series_record(chosen_by: str, grpc_code: int, cs: CodeStats) -> SeriesRecord:
    return {
        "chosen_by": chosen_by,
        "code": 200,
        "grpc_code": grpc_code,
        "count": cs.count,
        "sum": cs.total,
        "buckets": list(cs.buckets),
    }
