"""The autoscaler beside a controller: what it scales, and how the two are joined.

The autoscaler knows nothing of the controller: it is handed a function returning the
version endpoints to scale (:class:`~merlin_dp.autoscaler.scaler.ScaledVersion`, those
running or serving), a runtime to actuate and the gateways' signals. Here the controller
builds that view of its state, passes the gateways' pokes (``POST /v1/activations``) to
the autoscaler and serves its metrics on ``/metrics``.
"""

from __future__ import annotations

from merlin_dp.autoscaler.collector import SignalSource
from merlin_dp.autoscaler.policy import PolicyConfig
from merlin_dp.autoscaler.scaler import Autoscaler, ScaledVersion
from merlin_dp.controller.models import VersionEndpoint
from merlin_dp.controller.service import Controller
from merlin_dp.runtime import Runtime

SCALED_STATUSES = ("running", "serving")


def scaled(versions: dict[str, VersionEndpoint]) -> dict[str, ScaledVersion]:
    """The version endpoints the autoscaler scales now: those running or serving."""
    return {
        key: ScaledVersion(rec.project, rec.model, rec.version,
                           rec.spec.autoscaling_policy, rec.spec.resource_request)
        for key, rec in versions.items()
        if rec.status in SCALED_STATUSES
    }  # fmt: skip


def attach_autoscaler(
    controller: Controller,
    signals: SignalSource,
    timings: PolicyConfig | None = None,
    interval: float = 1.0,
    runtime: Runtime | None = None,
) -> Autoscaler:
    """Run an autoscaler beside a controller: it scales the controller's runtime (or
    ``runtime``), takes the gateways' pokes (``POST /v1/activations``) and serves its
    metrics (``/metrics``)."""
    actuator = runtime or controller.runtime
    assert actuator is not None, "the autoscaler actuates a runtime"
    scaler = Autoscaler(
        lambda: scaled(controller.state.versions),
        actuator,
        signals,
        interval=interval,
        timings=timings,
    )
    controller.activations = scaler.poke
    controller.metrics.append(scaler.metrics.render)
    scaler.start()
    return scaler
