"""The autoscaler's own metrics: what it saw, what it decided, and what it could not see.

:class:`AutoscalerMetrics` holds plain numbers the decision loop sets (no
prometheus-client objects, no global registry); :meth:`AutoscalerMetrics.render` builds
metric families from them into a private registry and returns the Prometheus text format
0.0.4, the way ``merlin_dp/gateway/metrics.py`` does. Per version endpoint (labels ``project``,
``model``, ``version``):

- ``merlin_autoscaler_desired_replicas``, ``merlin_autoscaler_ready_replicas``;
- ``merlin_autoscaler_signal_value{metric}``: what the policy read (rps, concurrency, or
  percent of request for ``cpu_utilization`` and ``memory_utilization``; the service
  time, the queue and requests in service; the forecast's period, prediction and error);
  absent while there is no value;
- ``merlin_autoscaler_replica_metrics_missing{reason}``: ready replicas that did not
  report CPU or memory this tick, by reason (see ``merlin_dp.autoscaler.resources``);
- ``merlin_autoscaler_decisions_total{reason}`` (``forecast``: a pre-warm ahead of
  predicted load), ``merlin_autoscaler_activations_total``.

Per gateway: ``merlin_autoscaler_gateway_poll_failures_total{gateway}`` and
``merlin_autoscaler_signal_age_seconds{gateway}`` (``+Inf`` until it first reports).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from merlin_dp.autoscaler.policy import Signals
from merlin_dp.autoscaler.resources import MISSING_REASONS, Utilization

VERSION_LABELS = ("project", "model", "version")
MAX_REASONS = 32  # distinct decision reasons per version; beyond that they count as "other"
_NUMBER = re.compile(r"\s*[-+]?[0-9][0-9.]*%?")


def reason_label(reason: str) -> str:
    """A decision reason without its numbers (``"utilization 87%"`` → ``"utilization"``),
    so the label has a handful of values rather than one per observed figure."""
    return _NUMBER.sub("", reason).strip() or "unknown"


def version_labels(key: str) -> list[str]:
    """``project/model/version`` as the three label values."""
    parts = key.split("/", 2)
    return [*parts, *[""] * (3 - len(parts))]


@dataclass(slots=True)
class _Version:
    desired: int | None = None
    ready: int | None = None
    signals: dict[str, float] = field(default_factory=dict)  # metric -> value
    missing: dict[str, int] | None = None  # reason -> replicas, once utilization is observed
    decisions: dict[str, int] = field(default_factory=dict)  # reason label -> count
    activations: int = 0


@dataclass(slots=True)
class _Gateway:
    failures: int = 0
    age: float | None = None


class AutoscalerMetrics:
    def __init__(self) -> None:
        self._versions: dict[str, _Version] = {}
        self._gateways: dict[str, _Gateway] = {}

    def _version(self, key: str) -> _Version:
        series = self._versions.get(key)
        if series is None:
            series = self._versions[key] = _Version()
        return series

    def observe_decision(
        self, key: str, *, desired: int, ready: int, reason: str, metric: str, value: float | None
    ) -> None:
        """One decision for ``key``: the replicas asked for and ready, why, and the value
        of the policy's metric it was made on (``None``: there was none)."""
        series = self._version(key)
        series.desired = desired
        series.ready = ready
        self._set_signal(series, metric, value)
        label = reason_label(reason)
        if label not in series.decisions and len(series.decisions) >= MAX_REASONS:
            label = "other"
        series.decisions[label] = series.decisions.get(label, 0) + 1

    def observe_inputs(self, key: str, signals: Signals) -> None:
        """What the gateways' records said, as the policy read it: the service time, the
        backlog and requests in service, and the forecast (its period, the most arrivals
        per second it predicts within a start-up time, and its error over the panic
        window just past: |predicted - came| / the larger, 0 when both are nothing)."""
        series = self._version(key)
        self._set_signal(series, "service_time_seconds", signals.service_time or None)
        self._set_signal(series, "queued", signals.queued)
        self._set_signal(series, "in_service", signals.in_service)
        period = signals.period or None
        self._set_signal(series, "forecast_period_seconds", period)
        self._set_signal(series, "forecast_rps", signals.forecast_rate if period else None)
        error = None
        if period:
            top = max(signals.forecast_past, signals.rate_panic)
            error = abs(signals.forecast_past - signals.rate_panic) / top if top > 0 else 0.0
        self._set_signal(series, "forecast_error", error)

    def observe_utilization(self, key: str, utilization: Utilization) -> None:
        """A scrape's result for ``key``: CPU and memory values and the missing counts."""
        series = self._version(key)
        self._set_signal(series, "cpu_utilization", utilization.cpu)
        self._set_signal(series, "memory_utilization", utilization.memory)
        series.missing = {r: utilization.missing.get(r, 0) for r in MISSING_REASONS}

    def set_gateway(self, url: str, failures: int, age: float | None) -> None:
        """A gateway's polls that failed so far, and seconds since it last reported
        (``None``: never)."""
        self._gateways[url] = _Gateway(failures, age)

    def activation(self, key: str) -> None:
        """Count a scale from zero started because requests were waiting for ``key``."""
        self._version(key).activations += 1

    def retain(self, keys: Iterable[str]) -> None:
        """Drop the series of every version endpoint not in ``keys``."""
        keep = set(keys)
        for key in self._versions.keys() - keep:
            del self._versions[key]

    def render(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self._versions, self._gateways))
        return generate_latest(registry).decode("utf-8")

    @staticmethod
    def _set_signal(series: _Version, metric: str, value: float | None) -> None:
        if value is None:
            series.signals.pop(metric, None)
        else:
            series.signals[metric] = value


class _Collector(Collector):
    def __init__(self, versions: dict[str, _Version], gateways: dict[str, _Gateway]) -> None:
        self._versions = versions
        self._gateways = gateways

    def collect(self) -> Iterator[Metric]:
        labels = list(VERSION_LABELS)
        desired = GaugeMetricFamily(
            "merlin_autoscaler_desired_replicas",
            "Replicas the last decision asked for, by version endpoint.",
            labels=labels,
        )
        ready = GaugeMetricFamily(
            "merlin_autoscaler_ready_replicas",
            "Ready replicas when the last decision was made, by version endpoint.",
            labels=labels,
        )
        signal = GaugeMetricFamily(
            "merlin_autoscaler_signal_value",
            "Signal values the policy reads: rps and concurrency (mean over the stable "
            "window), cpu_utilization and memory_utilization (mean percent of request), "
            "service_time_seconds (dispatch to answer), queued and in_service (the last "
            "second's mean), forecast_period_seconds, forecast_rps (most arrivals per "
            "second predicted within a start-up time) and forecast_error (relative, over "
            "the panic window just past).",
            labels=[*labels, "metric"],
        )
        missing = GaugeMetricFamily(
            "merlin_autoscaler_replica_metrics_missing",
            "Ready replicas whose CPU or memory was not read at the last scrape, by reason.",
            labels=[*labels, "reason"],
        )
        decisions = CounterMetricFamily(
            "merlin_autoscaler_decisions_total",
            "Scaling decisions made, by version endpoint and reason.",
            labels=[*labels, "reason"],
        )
        activations = CounterMetricFamily(
            "merlin_autoscaler_activations_total",
            "Scale-ups from zero started by requests waiting for a version endpoint.",
            labels=labels,
        )
        for key in sorted(self._versions):
            series = self._versions[key]
            values = version_labels(key)
            if series.desired is not None:
                desired.add_metric(values, series.desired)
            if series.ready is not None:
                ready.add_metric(values, series.ready)
            for metric in sorted(series.signals):
                signal.add_metric([*values, metric], series.signals[metric])
            if series.missing is not None:
                for reason, n in series.missing.items():
                    missing.add_metric([*values, reason], n)
            for reason in sorted(series.decisions):
                decisions.add_metric([*values, reason], series.decisions[reason])
            activations.add_metric(values, series.activations)
        failures = CounterMetricFamily(
            "merlin_autoscaler_gateway_poll_failures_total",
            "Polls of a gateway's signals that failed.",
            labels=["gateway"],
        )
        age = GaugeMetricFamily(
            "merlin_autoscaler_signal_age_seconds",
            "Seconds since a gateway last reported signals (+Inf: never).",
            labels=["gateway"],
        )
        for url in sorted(self._gateways):
            gw = self._gateways[url]
            failures.add_metric([url], gw.failures)
            age.add_metric([url], gw.age if gw.age is not None else float("inf"))
        yield from (desired, ready, signal, missing, decisions, activations, failures, age)
