"""Gateway counters: cheap to record on the hot path, mergeable across workers.

The hot path bumps plain slot attributes on objects it already holds (a version's
:class:`VersionStats` hangs off the route table), so recording a request costs a dict
lookup by status code, a bisect and a few additions, and no lock. A worker exports its
counters as a JSON-able snapshot; the admin port merges the snapshots of every worker
and renders them in the Prometheus text format with prometheus-client, so ``/metrics``
is correct whether one process or N serve the traffic port.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from merlin_dp.gateway.pool.http1 import UpstreamStats

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip
# How a version was chosen: a metric label, and the index into VersionStats.by_choice.
CHOSEN_BY = ("weight", "direct", "match", "sticky")
CHOSEN_WEIGHT = 0
CHOSEN_DIRECT = 1
CHOSEN_MATCH = 2
CHOSEN_STICKY = 3

Snapshot = dict[str, Any]
PerVersion = TypeVar("PerVersion")


# Waiting for a replica to start from zero: from a fast local process to a slow image pull.
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


class CodeStats:
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
                 "version")  # fmt: skip

    def __init__(self, project: str, model: str, version: str) -> None:
        self.project = project
        self.model = model
        self.version = version
        self.in_flight = 0
        self.arrivals = 0  # requests started, for the autoscaler's per-second rate
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


class ShadowStats:
    """Per shadow (mirror) version: copies by result, comparisons, latency."""

    __slots__ = ("compared", "latency", "mismatch", "model", "project", "results", "version")

    def __init__(self, project: str, model: str, version: str) -> None:
        self.project = project
        self.model = model
        self.version = version
        self.results: dict[str, int] = {}  # "sent|", "dropped|concurrency", "error|timeout"
        self.compared = 0
        self.mismatch: dict[str, int] = {}  # status | body
        self.latency = CodeStats()

    def count(self, result: str, reason: str) -> None:
        key = f"{result}|{reason}"
        self.results[key] = self.results.get(key, 0) + 1


class ActivationStats:
    """Per version endpoint: requests held while it started from zero, and how long."""

    __slots__ = ("cold_start", "held", "model", "overflow", "poke_errors", "pokes",
                 "project", "timed_out", "version")  # fmt: skip

    def __init__(self, project: str, model: str, version: str) -> None:
        self.project = project
        self.model = model
        self.version = version
        self.held = 0
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
        self._shadows: dict[tuple[str, str, str], ShadowStats] = {}
        self._activations: dict[tuple[str, str, str], ActivationStats] = {}
        self.connections = ConnectionStats()
        self.unrouted: dict[int, int] = {}  # requests answered before a version was chosen
        self.table_revision = -1
        self.table_errors = 0

    def version(self, project: str, model: str, version: str) -> VersionStats:
        return _per_version(self._versions, VersionStats, project, model, version)

    def versions(self) -> Iterable[VersionStats]:
        return self._versions.values()

    def shadow(self, project: str, model: str, version: str) -> ShadowStats:
        return _per_version(self._shadows, ShadowStats, project, model, version)

    def activation(self, project: str, model: str, version: str) -> ActivationStats:
        return _per_version(self._activations, ActivationStats, project, model, version)

    def count_unrouted(self, code: int) -> None:
        self.unrouted[code] = self.unrouted.get(code, 0) + 1

    def snapshot(self, source_connected: bool = True) -> Snapshot:
        versions = []
        for vs in self._versions.values():
            # gRPC calls are HTTP 200s; their status is the grpc_code.
            series = _series(vs.by_choice, lambda code: {"code": code})
            series += _series(vs.grpc_by_choice, lambda code: {"code": 200, "grpc_code": code})
            versions.append(
                {
                    "project": vs.project,
                    "model": vs.model,
                    "version": vs.version,
                    "in_flight": vs.in_flight,
                    "series": series,
                }
            )
        shadows = [
            {
                "project": sh.project,
                "model": sh.model,
                "version": sh.version,
                "results": dict(sh.results),
                "compared": sh.compared,
                "mismatch": dict(sh.mismatch),
                "count": sh.latency.count,
                "sum": sh.latency.total,
                "buckets": list(sh.latency.buckets),
            }
            for sh in self._shadows.values()
        ]
        activations = [
            {
                "project": a.project,
                "model": a.model,
                "version": a.version,
                "held": a.held,
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
            "shadows": shadows,
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


def empty_snapshot() -> Snapshot:
    """No counts, and not connected: what a worker that doesn't answer contributes."""
    return GatewayMetrics(UpstreamStats()).snapshot(source_connected=False)


def _series(
    by_choice: tuple[dict[int, CodeStats], ...], codes: Callable[[int], dict[str, int]]
) -> list[dict[str, Any]]:
    return [
        {
            "chosen_by": CHOSEN_BY[i],
            **codes(code),
            "count": cs.count,
            "sum": cs.total,
            "buckets": list(cs.buckets),
        }
        for i, by_code in enumerate(by_choice)
        for code, cs in by_code.items()
    ]


def merge_snapshots(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Merge the snapshots of several workers into one.

    Numbers add, dicts merge by key, lists add element-wise; lists of labelled records
    (versions, their series, shadows) merge records with the same labels. Adding is right
    for every counter and for the gauges that count things (requests in flight, client
    connections open); the two gauges about the route table are not counts and take the
    minimum: the revision every worker serves, and ``source_connected`` is 1 only if
    every worker follows its route source (so an alert on 0 fires when any one serves a
    stale table; a worker that doesn't answer counts as not following).
    """
    merged: Snapshot = empty_snapshot()
    revisions: list[int] = []
    connected: list[int] = []
    for snap in snapshots:
        table = snap["table"]
        revisions.append(table["revision"])
        connected.append(table["source_connected"])
        _add(merged, snap)
    # Workers may briefly disagree during a swap; the oldest is what is guaranteed.
    merged["table"]["revision"] = min(revisions, default=-1)
    merged["table"]["source_connected"] = min(connected, default=0)
    return merged


_IDENTITY = ("project", "model", "version", "chosen_by", "code", "grpc_code")


def _identity(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(k) for k in _IDENTITY)


def _add(into: dict[str, Any], item: dict[str, Any]) -> None:
    for key, value in item.items():
        have = into.get(key)
        if have is None:
            into[key] = _copy(value)
        elif isinstance(value, dict):
            _add(have, value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            index = {_identity(r): r for r in have}
            for record in value:
                found = index.get(_identity(record))
                if found is None:
                    have.append(_copy(record))
                else:
                    _add(found, record)
        elif isinstance(value, list):
            into[key] = [a + b for a, b in zip(have, value, strict=True)]
        elif key not in _IDENTITY and isinstance(value, int | float):
            into[key] = have + value


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snap = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        # grpc_code is empty (no label, to Prometheus) on HTTP_JSON requests.
        labels = ["project", "model", "version", "chosen_by", "code", "grpc_code"]
        requests = CounterMetricFamily(
            "gateway_requests", "Requests answered, by version endpoint and status.", labels=labels
        )
        duration = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Time from request received to response complete, by version endpoint.",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "gateway_in_flight_requests",
            "Requests being served, by version endpoint.",
            labels=["project", "model", "version"],
        )
        bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
        for v in snap["versions"]:
            vlabels = [v["project"], v["model"], v["version"]]
            in_flight.add_metric(vlabels, v["in_flight"])
            for s in v["series"]:
                grpc_code = s.get("grpc_code")
                values = [
                    *vlabels,
                    s["chosen_by"],
                    str(s["code"]),
                    "" if grpc_code is None else str(grpc_code),
                ]
                requests.add_metric(values, s["count"])
                duration.add_metric(values, _cumulative(bounds, s["buckets"]), s["sum"])
        unrouted = CounterMetricFamily(
            "gateway_unrouted_requests",
            "Requests answered before a version endpoint was chosen (unknown host, bad input).",
            labels=["code"],
        )
        for code, n in snap["unrouted"].items():
            unrouted.add_metric([code], n)
        up = snap["upstream"]
        errors = CounterMetricFamily(
            "gateway_upstream_errors", "Failed exchanges with replicas, by kind.", labels=["kind"]
        )
        for kind, n in up["errors"].items():
            errors.add_metric([kind], n)
        yield requests
        yield duration
        yield in_flight
        yield from _shadow_families(snap.get("shadows", []), bounds)
        yield from _activation_families(snap.get("activations", []))
        yield unrouted
        yield errors
        conns = snap.get("connections", {})
        yield GaugeMetricFamily(
            "gateway_client_connections",
            "Client connections open now on the traffic port (the admin port's not counted).",
            value=conns.get("open", 0),
        )
        cut = CounterMetricFamily(
            "gateway_client_connections_cut",
            "Client connections answered and closed for abuse, by reason "
            "(max_connections: 503; head_timeout: 408, the request head came too slowly).",
            labels=["reason"],
        )
        cut.add_metric(["max_connections"], conns.get("refused", 0))
        cut.add_metric(["head_timeout"], conns.get("head_timeouts", 0))
        yield cut
        yield CounterMetricFamily(
            "gateway_retries", "Requests retried on another replica.", value=up["retries"]
        )
        yield CounterMetricFamily(
            "gateway_ejections", "Replicas ejected by outlier detection.", value=up["ejections"]
        )
        yield CounterMetricFamily(
            "gateway_upstream_connects", "Connections opened to replicas.", value=up["connects"]
        )
        yield GaugeMetricFamily(
            "gateway_route_table_revision",
            "Revision of the route table being served (the oldest across workers).",
            value=snap["table"]["revision"],
        )
        yield GaugeMetricFamily(
            "gateway_route_source_connected",
            "1 if every worker follows its route source now; 0 if any serves its last good "
            "table (or does not answer).",
            value=snap["table"].get("source_connected", 0),
        )
        yield CounterMetricFamily(
            "gateway_route_table_errors",
            "Route tables rejected (invalid file or feed); the last good table stays.",
            value=snap["table"]["errors"],
        )


def _shadow_families(shadows: list[dict[str, Any]], bounds: list[str]) -> Iterator[Metric]:
    labels = ["project", "model", "version"]
    requests = CounterMetricFamily(
        "gateway_shadow_requests",
        "Mirrored copies by result (sent, dropped, error) and reason.",
        labels=[*labels, "result", "reason"],
    )
    compared = CounterMetricFamily(
        "gateway_shadow_compared", "Shadow answers compared with the primary's.", labels=labels
    )
    mismatch = CounterMetricFamily(
        "gateway_shadow_mismatch",
        "Shadow answers that disagreed with the primary's, by kind (status, body).",
        labels=[*labels, "kind"],
    )
    duration = HistogramMetricFamily(
        "gateway_shadow_duration_seconds",
        "Time for the shadow version to answer a mirrored copy.",
        labels=labels,
    )
    for sh in shadows:
        base = [sh["project"], sh["model"], sh["version"]]
        for key, n in sh["results"].items():
            result, _, reason = key.partition("|")
            requests.add_metric([*base, result, reason], n)
        compared.add_metric(base, sh["compared"])
        for kind in ("status", "body"):
            mismatch.add_metric([*base, kind], sh["mismatch"].get(kind, 0))
        duration.add_metric(base, _cumulative(bounds, sh["buckets"]), sh["sum"])
    yield requests
    yield compared
    yield mismatch
    yield duration


def _activation_families(activations: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["project", "model", "version"]
    held = CounterMetricFamily(
        "gateway_activation_requests",
        "Requests that arrived while their version endpoint had no replica, by outcome "
        "(held: waited for one; overflow, timed_out: answered 503).",
        labels=[*labels, "result"],
    )
    pokes = CounterMetricFamily(
        "gateway_activation_pokes",
        "Calls telling the autoscaler requests wait at zero, by result.",
        labels=[*labels, "result"],
    )
    cold = HistogramMetricFamily(
        "gateway_cold_start_seconds",
        "How long requests waited for their version endpoint to start from zero.",
        labels=labels,
    )
    bounds = [*(repr(b) for b in COLD_START_BUCKETS), "+Inf"]
    for a in activations:
        base = [a["project"], a["model"], a["version"]]
        for result in ("held", "overflow", "timed_out"):
            held.add_metric([*base, result], a[result])
        pokes.add_metric([*base, "ok"], a["pokes"])
        pokes.add_metric([*base, "error"], a["poke_errors"])
        cold.add_metric(base, _cumulative(bounds, a["buckets"]), a["sum"])
    yield held
    yield pokes
    yield cold


def _cumulative(bounds: list[str], buckets: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts to the cumulative (le, count) pairs Prometheus histograms use."""
    out: list[tuple[str, float]] = []
    acc = 0
    for bound, n in zip(bounds, buckets, strict=True):
        acc += n
        out.append((bound, acc))
    return out


def render(snapshot: Snapshot) -> bytes:
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)
