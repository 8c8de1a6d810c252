"""The decision loop's inputs: what the scaler hands the policy, from a gateway's
signals served over real HTTP and a runtime's replica view, on an injected clock."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from merlin_dp.autoscaler.collector import GatewaySignals
from merlin_dp.autoscaler.scaler import Autoscaler, ScaledVersion
from merlin_dp.runtime import ReplicaInfo
from merlin_dp.spec.endpoints import AutoscalingPolicy, ResourceRequest
from tests.conftest import Replica
from tests.fakes import FakeClock, FakeRuntime

NOW = 1_000_000.0


def record(second: int, requests: int, concurrency: float) -> dict[str, Any]:
    """A gateway's second with nothing queued: as many answered as arrived, the time in
    service adding up to the mean in flight."""
    return {"project": "fraud", "model": "scorer", "version": "1", "second": second,
            "requests": requests, "concurrency": concurrency, "in_service": concurrency,
            "queued": 0.0, "completions": requests, "service_seconds": concurrency}  # fmt: skip


def endpoint(**policy: Any) -> ScaledVersion:
    return ScaledVersion(
        "fraud", "scorer", "1",
        AutoscalingPolicy.model_validate(
            {"metrics_type": "concurrency", "target_value": 1, **policy}
        ),
        ResourceRequest(min_replica=1, max_replica=50),
    )  # fmt: skip


async def test_the_policy_gets_rates_service_time_and_start_up_time() -> None:
    # 60 s of 100 requests/s answered in 5 s of service each second: 50 ms per request.
    records = [record(int(NOW) - s, 100, 5.0) for s in range(1, 61)]

    async def signals(_: web.Request) -> web.Response:
        return web.json_response({"signals": records})

    app = web.Application()
    app.router.add_get("/signals", signals)
    gateway = await Replica("gw", app).start()
    ready = [ReplicaInfo(f"r{i}", f"127.0.0.1:{i + 1}", "ready", ready_after=2.5)
             for i in range(8)]  # fmt: skip
    runtime = FakeRuntime(ready)
    clock = FakeClock(NOW)
    scaler = Autoscaler(
        lambda: {"fraud/scorer/1": endpoint()},
        runtime,
        GatewaySignals([f"http://{gateway.address}"]),
        clock=clock,
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
        # in 0.9 s of service would say 300 ms); the last good one holds.
        clock.advance(120)
        records[:] = [record(int(NOW) + 119, 3, 0.9)]
        await scaler.tick()
        seen = scaler.last_signals["fraud/scorer/1"]
        assert seen.rate_stable == 3 / 60 and seen.rate_recent == 3.0
        assert math.isclose(seen.service_time, 0.05)
    finally:
        await scaler.close()
        await gateway.stop()


async def test_two_gateways_sum_and_a_silent_one_ages_out() -> None:
    """Pulled from two admin ports: seconds add up; a gateway that stops answering is
    counted as missing (the scaler holds) and its old seconds leave the windows."""
    served: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

    def app(name: str) -> web.Application:
        async def signals(request: web.Request) -> web.Response:
            since = int(request.query["since"])
            return web.json_response({"signals": [r for r in served[name] if r["second"] > since]})

        a = web.Application()
        a.router.add_get("/signals", signals)
        return a

    gw_a = await Replica("a", app("a")).start()
    gw_b = await Replica("b", app("b")).start()
    collector = GatewaySignals([f"http://{gw_a.address}", f"http://{gw_b.address}"])
    second = int(NOW) - 1
    served["a"].append(record(second, 30, 1.5))
    served["b"].append(record(second, 20, 1.0))
    try:
        assert await collector.poll(NOW) == (2, 2)
        series = collector.series(("fraud", "scorer", "1"))
        rps, conc = series.requests, series.concurrency
        assert rps.average(NOW, 1) == 50 and conc.average(NOW, 1) == 2.5
        # Asking again returns nothing twice: only seconds after the last one reported.
        assert await collector.poll(NOW + 0.5) == (2, 2)
        assert rps.average(NOW, 1) == 50
        await gw_b.stop()
        served["a"].append(record(second + 1, 30, 1.5))
        assert await collector.poll(NOW + 1) == (1, 2)
        assert collector.failures[f"http://{gw_b.address}"] == 1
        assert rps.average(NOW + 1, 1) == 30  # b's last second counted; nothing new from b
        # A minute later b's seconds are out of every window: nothing frozen.
        assert await collector.poll(NOW + 62) == (1, 2)
        assert rps.average(NOW + 62, 60) == 0
    finally:
        await collector.close()
        await gw_a.stop()
        await gw_b.stop()
