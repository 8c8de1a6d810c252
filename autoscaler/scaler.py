"""The decision loop: signals in, policy decisions out, actuated through the runtime.

Every ``interval`` it polls the gateways, and for every running version endpoint builds
:class:`~autoscaler.policy.Signals` from the windows and the runtime's replica states,
asks :func:`~autoscaler.policy.decide`, and scales the runtime when the answer differs
from what runs. The clock is injected; the policy state per version lives here.

Not yet: CPU/memory scraping for the utilization metrics (they hold at the current
count), and scale to zero — it waits for activation in the gateway, so the loop never
goes below one replica for now.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from autoscaler.collector import GatewaySignals
from autoscaler.policy import PolicyConfig, PolicyState, Signals, decide
from controller.models import VersionEndpoint
from controller.runtime import Runtime

log = logging.getLogger("autoscaler")


def policy_config(rec: VersionEndpoint) -> PolicyConfig:
    spec = rec.spec
    return PolicyConfig(
        metrics_type=spec.autoscaling_policy.metrics_type,
        target_value=spec.autoscaling_policy.target_value,
        # Scale to zero needs activation in the gateway; until then keep one replica.
        min_replica=max(1, spec.resource_request.min_replica),
        max_replica=spec.resource_request.max_replica,
    )


class Autoscaler:
    def __init__(
        self,
        versions: Callable[[], dict[str, VersionEndpoint]],
        runtime: Runtime,
        signals: GatewaySignals,
        clock: Callable[[], float] = time.time,
        interval: float = 1.0,
    ) -> None:
        self.versions = versions
        self.runtime = runtime
        self.signals = signals
        self.clock = clock
        self.interval = interval
        self.states: dict[str, PolicyState] = {}
        self.last_reason: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        now = self.clock()
        answered = await self.signals.poll(now)
        for key, rec in list(self.versions().items()):
            if rec.status not in ("running", "serving"):
                continue
            config = policy_config(rec)
            replicas = self.runtime.replicas(key)
            ready = sum(1 for r in replicas if r.state == "ready")
            starting = sum(1 for r in replicas if r.state in ("starting", "unready"))
            draining = sum(1 for r in replicas if r.state == "draining")
            rps, conc = self.signals.buckets((rec.project, rec.model, rec.version))
            series = rps if config.metrics_type == "rps" else conc
            observed = Signals(
                stable=series.average(now, config.stable_window),
                panic=series.average(now, config.panic_window),
                ready=ready,
                starting=starting,
                draining=draining,
                complete=answered == len(self.signals.admin_urls),
            )
            state = self.states.get(key) or PolicyState(desired=ready + starting)
            if not observed.complete and answered == 0:
                continue  # nobody reported: hold (the HPA's rule for missing data)
            decision = decide(config, observed, state, now)
            self.states[key] = decision.state
            self.last_reason[key] = decision.reason
            live = ready + starting
            if decision.desired != live:
                log.info("scaling %s from %d to %d (%s)", key, live, decision.desired,
                         decision.reason)  # fmt: skip
                await self.runtime.scale(key, decision.desired)
