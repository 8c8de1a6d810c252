"""A real gateway and the simulator's simulated gateway emit records of the same meaning:
a fixed 50 ms replica taking one request at a time, at 30% and at 150% of what it can
serve — the service time is the replica's 50 ms in both, however long the queue; the
queue is near zero below capacity and visible above it."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp
import pytest

from loadtests import autoscale_sim as sim
from merlin_dp.spec.signals import SignalRecord
from tests.conftest import model_endpoint, start_replicas, version

# A live gateway's per-second counts, compared with the simulator's: a neighbour's CPU
# load shifts requests across seconds. The test command runs these alone.
pytestmark = pytest.mark.alone

SERVICE_S = 0.05  # one replica, one request at a time: 20 requests/s at most


def summary(records: list[SignalRecord]) -> tuple[float, float]:
    """(mean service time, mean requests queued) over the records."""
    completions = sum(r["completions"] for r in records)
    busy = sum(r["service_seconds"] for r in records)
    return busy / completions, sum(r["queued"] for r in records) / len(records)


async def live(
    gateway_factory: Any, replicas: Any, rate: float, seconds: int
) -> tuple[float, float]:
    (r1,) = await start_replicas(replicas, "a")
    gw = await gateway_factory({
        "version_endpoints": [version("fraud", "scorer", "1", [r1.address],
                                      container_concurrency=1)],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    })  # fmt: skip
    rng = random.Random(5)
    loop = asyncio.get_running_loop()
    calls = []
    # Start on a whole second so the records' seconds are whole seconds of load.
    await asyncio.sleep(1 - time.time() % 1)
    started = int(time.time())
    at, end = loop.time(), loop.time() + seconds

    async def one(s: aiohttp.ClientSession) -> int:
        async with s.get(
            gw.url(f"/sleep?s={SERVICE_S}"), headers={"Host": "scorer.fraud.localhost"}
        ) as r:
            await r.read()
            return r.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        while True:
            at += rng.expovariate(rate)
            if at >= end:
                break
            await asyncio.sleep(max(0.0, at - loop.time()))
            calls.append(asyncio.ensure_future(one(s)))
        statuses = await asyncio.gather(*calls)
    # The last second counted closes (the recorder closes each within a sample of its
    # end; at 150% the queue drains seconds after it): wait for it, 1.2 s at most.
    last, deadline = started + seconds - 1, loop.time() + 1.2
    while not any(r["second"] >= last for r in gw.worker.signals.history):
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert set(statuses) == {200}
    records = [r for r in gw.worker.signals.history
               if started + 2 <= r["second"] < started + seconds]  # fmt: skip
    assert len(records) == seconds - 2
    return summary(records)


class Recorder:
    """A controller that keeps one replica and keeps the simulated gateway's records."""

    def __init__(self) -> None:
        self.records: list[SignalRecord] = []

    def decide(self, view: sim.View) -> int | None:
        if view.now > 0:
            self.records.append(sim.gateway_record(view, view.now - 1))
        return 1


def simulated(rate: float, seconds: int) -> tuple[float, float]:
    # A trickle in the warm-up (one replica's worth), the load from t = 0.
    trace = sim.Trace("load", "step", seconds, base=0.5, high=rate, at=1e-9)
    work = sim.make_workload(trace, 5)
    fixed = sim.Workload(work.arrivals, [SERVICE_S] * len(work.arrivals),
                         work.count_before, work.sum_before)  # fmt: skip
    recorder = Recorder()
    sim.simulate(trace, fixed, lambda view: recorder, 5, 1)
    return summary([r for r in recorder.records if 2 <= r["second"] < seconds])


@pytest.mark.parametrize(("load", "queue_seen"), [(0.3, False), (1.5, True)])
async def test_a_live_gateway_and_the_simulator_count_the_same_things(
    gateway_factory: Any, replicas: Any, load: float, queue_seen: bool
) -> None:
    rate = load / SERVICE_S
    live_service, live_queue = await live(gateway_factory, replicas, rate, 7)
    sim_service, sim_queue = simulated(rate, 7)
    assert sim_service == pytest.approx(SERVICE_S)
    assert live_service == pytest.approx(sim_service, rel=0.10)  # dispatch to answer
    if queue_seen:
        assert live_queue > 2 and sim_queue > 2  # the backlog is in the gateway
    else:
        assert live_queue < 0.2 and sim_queue < 0.2
