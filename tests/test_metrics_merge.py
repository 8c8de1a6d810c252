"""Merging workers' metrics snapshots: a worker with less to say must not break /metrics."""

from __future__ import annotations

from merlin_dp.gateway.exposition import render
from merlin_dp.gateway.metrics import CHOSEN_WEIGHT, GatewayMetrics
from merlin_dp.gateway.metrics_snapshot import empty_snapshot, merge_snapshots
from merlin_dp.gateway.pool.upstream import UpstreamStats


def busy_worker() -> GatewayMetrics:
    metrics = GatewayMetrics(UpstreamStats())
    metrics.version("fraud", "scorer", "1").record(CHOSEN_WEIGHT, 200, 0.01)
    metrics.mirror("fraud", "scorer", "2").latency.observe(0.02)
    metrics.activation("fraud", "scorer", "1").cold_start.observe(1.0)
    return metrics


def test_a_worker_that_does_not_answer_adds_nothing() -> None:
    merged = merge_snapshots([busy_worker().snapshot(), empty_snapshot()])
    (version,) = merged["versions"]
    assert [s["count"] for s in version["series"]] == [1]
    assert merged["shadows"][0]["count"] == 1 and merged["activations"][0]["count"] == 1
    assert merged["table"]["source_connected"] == 0
    assert b'gateway_requests_total{chosen_by="weight",code="200"' in render(merged)


def test_a_worker_yet_to_serve_a_version_adds_nothing_to_its_series() -> None:
    idle = GatewayMetrics(UpstreamStats())
    idle.version("fraud", "scorer", "1")  # in the table, no request yet
    for order in ([busy_worker(), idle], [idle, busy_worker()]):
        merged = merge_snapshots([m.snapshot() for m in order])
        (version,) = merged["versions"]
        assert [(s["code"], s["count"]) for s in version["series"]] == [(200, 1)]


def test_series_of_the_same_labels_add_up() -> None:
    merged = merge_snapshots([busy_worker().snapshot(), busy_worker().snapshot()])
    (series,) = merged["versions"][0]["series"]
    assert series["count"] == 2 and sum(series["buckets"]) == 2
    assert merged["shadows"][0]["count"] == 2
