"""The decision loop: signals in, policy decisions out, actuated through the runtime.

Every ``interval`` it polls the gateways, and for every running version endpoint hands
the runtime's replica states to the version's
:class:`~merlin_dp.autoscaler.inputs.VersionAutoscaler` (the one signal path: records to
policy input to decision, the same one simulators drive), and scales the runtime when the
answer differs from what runs. The clock is injected.

A gateway holding requests for a version at zero pokes (:meth:`Autoscaler.poke`, through
the controller's ``POST /v1/activations``); the poke wakes the loop at once instead of
waiting for the next tick, and the held requests count as demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from merlin_dp.autoscaler.collector import SignalSource
from merlin_dp.autoscaler.inputs import Replicas, VersionAutoscaler
from merlin_dp.autoscaler.metrics import AutoscalerMetrics
from merlin_dp.autoscaler.policy import PolicyConfig, PolicyState, Signals
from merlin_dp.autoscaler.resources import ReplicaResources, Resource
from merlin_dp.common.aio import cancel_and_wait
from merlin_dp.runtime import Runtime
from merlin_dp.spec.endpoints import AutoscalingPolicy, ResourceRequest

log = logging.getLogger("autoscaler")


# A poke counts as demand for this long: gateways repeat theirs every second while
# requests wait, so a stale one means they stopped waiting.
POKE_FRESH_SECONDS = 3.0
# Scale events kept for whoever shows them (the controller's time series).
EVENTS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """One change of a version's replica count, as decided: from what ran to what was
    asked for, and why. ``cold_start``: from zero, with requests waiting for it."""

    at: float
    key: str
    from_replicas: int
    to_replicas: int
    reason: str
    cold_start: bool


@dataclass(frozen=True, slots=True)
class ScaledVersion:
    """A version endpoint to scale, as the autoscaler needs it: its name, its policy and
    what each replica asks for (the bounds and the utilization denominators)."""

    project: str
    model: str
    version: str
    policy: AutoscalingPolicy
    resources: ResourceRequest


def policy_config(v: ScaledVersion, base: PolicyConfig | None = None) -> PolicyConfig:
    """The version's policy: its own metric, target and bounds over the shared timings."""
    return replace(
        base or PolicyConfig(),
        metrics_type=v.policy.metrics_type,
        target_value=v.policy.target_value,
        min_replica=v.resources.min_replica,
        max_replica=v.resources.max_replica,
    )


class Autoscaler:
    def __init__(
        self,
        versions: Callable[[], Mapping[str, ScaledVersion]],
        runtime: Runtime,
        signals: SignalSource,
        clock: Callable[[], float] = time.time,
        interval: float = 1.0,
        timings: PolicyConfig | None = None,
    ) -> None:
        self.versions = versions
        self.runtime = runtime
        self.signals = signals
        self.clock = clock
        self.interval = interval
        self.timings = timings or PolicyConfig()
        self.scalers: dict[str, VersionAutoscaler] = {}  # per version: windows, state
        self._pokes: dict[str, tuple[int, float]] = {}  # key -> (waiting, when)
        self.resources = ReplicaResources()
        self.metrics = AutoscalerMetrics()
        self._wake = asyncio.Event()
        self._task: asyncio.Future[None] | None = None
        self._startup: dict[str, float] = {}  # key -> seconds the last replica took to ready
        self.desired: dict[str, int] = {}  # key -> the last decision's replica count
        self.events: deque[ScaleEvent] = deque(maxlen=EVENTS_KEPT)

    def poke(self, key: str, waiting: int) -> None:
        """Requests wait at zero for ``key``: decide now, not at the next tick."""
        self._pokes[key] = (waiting, self.clock())
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def tick(self) -> None:
        now = self.clock()
        answered, expected = await self.signals.poll(now)
        everyone = answered >= expected
        running = self.versions()
        for key, v in running.items():
            await self._decide(key, v, now, answered, everyone)
        self.resources.retain(running)
        self.metrics.retain(running)
        for gone in [k for k in self.scalers if k not in running]:
            del self.scalers[gone]
            self.desired.pop(gone, None)
        for url in self.signals.sources:
            seen = self.signals.last_seen.get(url)
            self.metrics.set_gateway(
                url, self.signals.failures.get(url, 0), None if seen is None else now - seen
            )

    async def _decide(
        self, key: str, v: ScaledVersion, now: float, answered: int, everyone: bool
    ) -> None:
        config = policy_config(v, self.timings)
        replicas = self.runtime.replicas(key)
        startups = [r.ready_after for r in replicas if r.ready_after is not None]
        if startups:
            self._startup[key] = startups[-1]
        ready = sum(1 for r in replicas if r.state == "ready")
        starting = sum(1 for r in replicas if r.state in ("starting", "unready"))
        draining = sum(1 for r in replicas if r.state == "draining")
        waiting, poked_at = self._pokes.get(key, (0, -math.inf))
        if now - poked_at > POKE_FRESH_SECONDS:
            waiting = 0
            self._pokes.pop(key, None)
        utilization: float | None = None
        complete = everyone
        if config.metrics_type in ("cpu_utilization", "memory_utilization"):
            resource: Resource = "cpu" if config.metrics_type == "cpu_utilization" else "memory"
            used = await self.resources.scrape(
                key, replicas, v.resources.cpu_request, v.resources.memory_request, now
            )
            self.metrics.observe_utilization(key, used)
            utilization = used.value(resource)
            complete = complete and used.complete(resource)
        scaler = self.scalers.get(key)
        if scaler is None:
            # A version first seen counts as just active: it gets its grace before zero.
            state = PolicyState(desired=ready + starting, last_active=now)
            series = self.signals.series((v.project, v.model, v.version))
            scaler = self.scalers[key] = VersionAutoscaler(config, state, series)
        if answered == 0 and not waiting:
            return  # no gateway reported: hold (the HPA's rule for missing data)
        decision = scaler.decide(
            Replicas(ready, starting, draining, self._startup.get(key, 0.0)), now,
            waiting=waiting, utilization=utilization, complete=complete, config=config,
        )  # fmt: skip
        observed = scaler.signals
        assert observed is not None
        value = utilization if config.metrics_type.endswith("_utilization") else observed.stable
        self.metrics.observe_decision(key, desired=decision.desired, ready=ready,
                                      reason=decision.reason, metric=config.metrics_type,
                                      value=value)  # fmt: skip
        self.metrics.observe_inputs(key, observed)
        self.desired[key] = decision.desired
        live = ready + starting
        if decision.desired != live:
            cold = live == 0 and bool(waiting)
            if cold:
                self.metrics.activation(key)
            self.events.append(ScaleEvent(now, key, live, decision.desired, decision.reason, cold))
            log.info("scaling %s from %d to %d (%s)", key, live, decision.desired,
                     decision.reason)  # fmt: skip
            await self.runtime.scale(key, decision.desired)
        elif decision.reason == "forecast" and observed.forecast_rate:
            log.info("%s: forecast of %.1f requests/s within the start-up time holds %d",
                     key, observed.forecast_rate, decision.desired)  # fmt: skip

    @property
    def last_signals(self) -> dict[str, Signals]:
        """Each version's last policy input."""
        return {k: s.signals for k, s in self.scalers.items() if s.signals is not None}

    @property
    def last_reason(self) -> dict[str, str]:
        return {k: s.reason for k, s in self.scalers.items()}

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        await self.signals.close()
        await self.resources.close()
