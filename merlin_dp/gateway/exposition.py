"""The Prometheus exposition of the gateway's metrics: ``/metrics`` from a snapshot.

:func:`render` turns a :class:`~merlin_dp.gateway.metrics_snapshot.Snapshot` (one
worker's, or every worker's merged) into the Prometheus text format with
prometheus-client. Metric names, labels and help texts are the gateway's public
interface (dashboards, alerts and the benchmarks read them): the mirror's metrics keep
their ``gateway_shadow_`` names.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from merlin_dp.gateway.metrics import COLD_START_BUCKETS
from merlin_dp.gateway.metrics_snapshot import ActivationRecord, MirrorRecord, Snapshot
from merlin_dp.spec.signals import LATENCY_BUCKETS


def render(snapshot: Snapshot) -> bytes:
    """``snapshot`` in the Prometheus text format (0.0.4), as ``/metrics`` answers."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class _SnapshotCollector(Collector):
    """The gateway's metric families, read from one snapshot when the registry collects."""

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
        yield from _mirror_families(snap["shadows"], bounds)
        yield from _activation_families(snap["activations"])
        yield unrouted
        yield errors
        conns = snap["connections"]
        yield GaugeMetricFamily(
            "gateway_client_connections",
            "Client connections open now on the traffic port (the admin port's not counted).",
            value=conns["open"],
        )
        cut = CounterMetricFamily(
            "gateway_client_connections_cut",
            "Client connections answered and closed for abuse, by reason "
            "(max_connections: 503; head_timeout: 408, the request head came too slowly).",
            labels=["reason"],
        )
        cut.add_metric(["max_connections"], conns["refused"])
        cut.add_metric(["head_timeout"], conns["head_timeouts"])
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
            value=snap["table"]["source_connected"],
        )
        yield CounterMetricFamily(
            "gateway_route_table_errors",
            "Route tables rejected (invalid file or feed); the last good table stays.",
            value=snap["table"]["errors"],
        )


def _mirror_families(mirrors: list[MirrorRecord], bounds: list[str]) -> Iterator[Metric]:
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
    for m in mirrors:
        base = [m["project"], m["model"], m["version"]]
        for key, n in m["results"].items():
            result, _, reason = key.partition("|")
            requests.add_metric([*base, result, reason], n)
        compared.add_metric(base, m["compared"])
        for kind in ("status", "body"):
            mismatch.add_metric([*base, kind], m["mismatch"].get(kind, 0))
        duration.add_metric(base, _cumulative(bounds, m["buckets"]), m["sum"])
    yield requests
    yield compared
    yield mismatch
    yield duration


def _activation_families(activations: list[ActivationRecord]) -> Iterator[Metric]:
    labels = ["project", "model", "version"]
    held = CounterMetricFamily(
        "gateway_activation_requests",
        "Requests that waited in their version endpoint's queue, by outcome (held: for a "
        "replica to start from zero; queued: for a free slot, every ready replica at its "
        "container_concurrency; overflow, timed_out: answered 503).",
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
        held.add_metric([*base, "held"], a["held"])
        held.add_metric([*base, "queued"], a["queued"])
        held.add_metric([*base, "overflow"], a["overflow"])
        held.add_metric([*base, "timed_out"], a["timed_out"])
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
