"""The decision loop's inputs: what the scaler hands the policy, from a gateway's
signals served over real HTTP and a runtime's replica view, on an injected clock."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from autoscaler.collector import GatewaySignals
from autoscaler.scaler import Autoscaler
from controller.models import VersionEndpoint
from controller.runtime import DeploySpec, ReplicaInfo
from tests.conftest import Replica

NOW = 1_000_000.0


class Runtime:
    """Replicas as the scaler sees them; scale() records what it was asked."""

    def __init__(self, replicas: list[ReplicaInfo]) -> None:
        self.view = replicas
        self.asked: list[int] = []

    async def deploy(self, spec: DeploySpec) -> None: ...

    async def scale(self, key: str, replicas: int) -> None:
        self.asked.append(replicas)

    async def undeploy(self, key: str) -> None: ...

    def replicas(self, key: str) -> list[ReplicaInfo]:
        return self.view

    def logs(self, key: str) -> list[str]:
        return []

    async def close(self) -> None: ...


def record(second: int, requests: int, concurrency: float) -> dict[str, Any]:
    return {"project": "fraud", "model": "scorer", "version": "1", "second": second,
            "requests": requests, "concurrency": concurrency}  # fmt: skip


def endpoint(**policy: Any) -> VersionEndpoint:
    return VersionEndpoint.model_validate({
        "project": "fraud", "model": "scorer", "version": "1", "status": "serving",
        "spec": {"type": "custom", "command": ["x"],
                 "resource_request": {"min_replica": 1, "max_replica": 50},
                 "autoscaling_policy": {"metrics_type": "concurrency", "target_value": 1,
                                        **policy}},
    })  # fmt: skip


async def test_the_policy_gets_rates_service_time_and_start_up_time() -> None:
    # 60 s of 100 requests/s at a mean of 5 in flight: 50 ms per request (Little's law).
    records = [record(int(NOW) - s, 100, 5.0) for s in range(1, 61)]

    async def signals(_: web.Request) -> web.Response:
        return web.json_response({"signals": records})

    app = web.Application()
    app.router.add_get("/signals", signals)
    gateway = await Replica("gw", app).start()
    ready = [ReplicaInfo(f"r{i}", f"127.0.0.1:{i + 1}", "ready", ready_after=2.5)
             for i in range(8)]  # fmt: skip
    runtime = Runtime(ready)
    clock = [NOW]
    scaler = Autoscaler(
        lambda: {"fraud/scorer/1": endpoint()},
        runtime,
        GatewaySignals([f"http://{gateway.address}"]),
        clock=lambda: clock[0],
    )
    try:
        await scaler.tick()
        seen = scaler.last_signals["fraud/scorer/1"]
        assert seen.rate_stable == 100.0 and seen.rate_panic == 100.0
        assert seen.rate_recent == 100.0
        assert math.isclose(seen.service_time, 0.05)
        assert seen.startup_time == 2.5 and seen.ready == 8
        # 100/s x 50 ms = 5 busy replicas at 70% of a target of 1: ceil(7.14) = 8 run.
        assert runtime.asked == []
        # Two minutes on, a trickle: too few requests to trust a new estimate (3 requests
        # at 0.9 in flight would say 300 ms); the last good one holds.
        clock[0] = NOW + 120
        records[:] = [record(int(NOW) + 119, 3, 0.9)]
        await scaler.tick()
        seen = scaler.last_signals["fraud/scorer/1"]
        assert seen.rate_stable == 3 / 60 and seen.rate_recent == 3.0
        assert math.isclose(seen.service_time, 0.05)
    finally:
        await scaler.close()
        await gateway.stop()
