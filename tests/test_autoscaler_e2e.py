"""The autoscaler end to end: the controller, a following gateway, the autoscaler and
real replica processes. A load ramp raises replicas and the added ones serve, idling
takes a version to zero, the first request at zero succeeds (held by the gateway while
the autoscaler, poked, starts a replica), and scaling down under load fails no request."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from merlin_dp.autoscaler.collector import GatewaySignals
from merlin_dp.autoscaler.policy import PolicyConfig
from merlin_dp.autoscaler.scaler import Autoscaler
from merlin_dp.controller.autoscaling import attach_autoscaler
from merlin_dp.controller.server import ControllerConfig, start_controller
from merlin_dp.controller.service import Controller
from merlin_dp.gateway.admin import admin_app, start_admin
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import ControllerRouteSource
from merlin_dp.gateway.worker import GatewayWorker, Report
from tests.conftest import ROOT
from tests.test_controller_api import BASE, Api

# Decisions here are judged against real clocks, with the clients, the gateway and the
# autoscaler on one event loop: a neighbour's CPU stalls them together (an open-loop
# client then sends its overdue requests at once). The test command runs these alone.
pytestmark = pytest.mark.alone

# The test replica, started under the contract: its port comes from CARAML_HTTP_PORT.
SLEEPY = [
    sys.executable, "-c",
    "import os, sys; sys.argv = ['x', '--port', os.environ['CARAML_HTTP_PORT']];"
    f"sys.path.insert(0, {str(ROOT)!r}); from tests.upstream_app import main; main()",
]  # fmt: skip
KEY = "fraud/scorer/1"
HOST = "scorer.fraud.localhost"
# Knative's timings scaled down so a test sees a whole cycle in seconds.
FAST = PolicyConfig(stable_window=4.0, panic_window=1.0, scale_down_delay=2.0,
                    scale_to_zero_grace=2.0, stabilization_window=3.0,
                    forecast_min_period=8.0)  # fmt: skip
# A pyfunc model that spends CPU on every request: n squares summed.
BURN_MODEL = """
class Burn:
    def load(self):
        pass

    def predict(self, payload):
        return {"sum": sum(i * i for i in range(int(payload["n"])))}
"""


@dataclass
class Stack:
    api: Api
    controller: Controller
    worker: GatewayWorker
    scaler: Autoscaler

    def ready(self) -> list[str]:
        return self.controller.state.versions[KEY].replicas

    def live(self) -> int:
        assert self.controller.runtime is not None
        return len(self.controller.runtime.replicas(KEY))

    async def until(self, what: str, check: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what}: {self.scaler.last_reason}"
            await asyncio.sleep(0.1)

    async def deploy(self, min_replica: int, max_replica: int, **spec: Any) -> None:
        spec = {
            "type": "custom",
            "command": SLEEPY,
            "resource_request": {"min_replica": min_replica, "max_replica": max_replica},
            "autoscaling_policy": {"metrics_type": "concurrency", "target_value": 1},
            **spec,
        }
        assert (await self.api.call("PUT", f"{BASE}/versions/1/endpoint", spec))[0] == 202
        await self.api.wait_status("1", "running")
        rule = {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
        assert (await self.api.call("PUT", f"{BASE}/endpoint", rule))[0] == 201


@pytest.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    """The stack on FAST's timings, deciding every 0.25 s, or as a test says (indirect
    parametrization: ``timings``, ``interval``)."""
    setup: dict[str, Any] = getattr(request, "param", {})
    timings: PolicyConfig = setup.get("timings", FAST)
    controller, runner, port = await start_controller(
        ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.5)
    )
    api = Api(f"http://127.0.0.1:{port}")
    worker = GatewayWorker(GatewayConfig(port=0, controller_url=api.url),
                           ControllerRouteSource(api.url))  # fmt: skip
    await worker.start()

    async def reports() -> list[Report]:
        return [worker.report()]

    admin, admin_port = await start_admin(admin_app(reports), "127.0.0.1", 0)
    scaler = attach_autoscaler(
        controller,
        GatewaySignals([f"http://127.0.0.1:{admin_port}"]),
        timings=timings,
        interval=setup.get("interval", 0.25),
    )
    try:
        yield Stack(api, controller, worker, scaler)
    finally:
        await scaler.close()
        await admin.cleanup()
        await worker.stop()
        await api.session.close()
        await runner.cleanup()
        await controller.close()


async def test_load_ramp_raises_replicas_and_they_serve(stack: Stack) -> None:
    await stack.deploy(min_replica=1, max_replica=4)
    failures: list[int] = []
    stop = asyncio.Event()

    async def client(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            status, _ = await _get(s, stack, "/sleep?s=0.3")
            if status != 200:
                failures.append(status)

    async with aiohttp.ClientSession() as s:
        clients = [asyncio.ensure_future(client(s)) for _ in range(6)]
        await stack.until("scaled up to 4", lambda: len(stack.ready()) == 4)
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    # The added replicas took traffic: the gateway's table has all four.
    assert len(stack.worker.proxy.table.versions[0].upstreams) == 4


# The HPA's scale-down stabilization at half FAST's 3 s: its two steps down (3 -> 2 -> 1)
# waited out the window each.
@pytest.mark.parametrize("stack", [{"timings": replace(FAST, stabilization_window=1.5)}],
                         indirect=True)  # fmt: skip
async def test_cpu_utilization_scales_on_what_replicas_report(stack: Stack, tmp_path: Path) -> None:
    """The HPA path: CPU scraped from each replica's /metrics, as percent of cpu_request."""
    (tmp_path / "burn.py").write_text(BURN_MODEL)
    await stack.deploy(
        min_replica=1,
        max_replica=3,
        type="pyfunc",
        command=[],
        model_dir=str(tmp_path),
        pyfunc_class="burn:Burn",
        resource_request={"min_replica": 1, "max_replica": 3, "cpu_request": "200m"},
        autoscaling_policy={"metrics_type": "cpu_utilization", "target_value": 50},
    )
    stop = asyncio.Event()
    failures: list[int] = []

    async def client(s: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with s.post(f"http://127.0.0.1:{stack.worker.port}/v1/predict",
                              json={"n": 200_000}, headers={"Host": HOST}) as r:  # fmt: skip
                await r.read()
                if r.status != 200:
                    failures.append(r.status)

    async with aiohttp.ClientSession() as s:
        clients = [asyncio.ensure_future(client(s)) for _ in range(2)]
        # One busy replica uses far more than 50% of 200m: the HPA ratio asks for more.
        await stack.until("scaled up on CPU", lambda: len(stack.ready()) == 3)
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    async with stack.api.session.get(stack.api.url + "/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    cpu = [s.value for s in families["merlin_autoscaler_signal_value"].samples
           if s.labels["metric"] == "cpu_utilization"]  # fmt: skip
    assert cpu and cpu[0] >= 0
    # Idle replicas report little CPU: after the stabilization window, back to one.
    await stack.until("scaled down on CPU", lambda: stack.live() == 1, timeout=40)


async def test_idle_goes_to_zero_and_the_first_request_at_zero_succeeds(stack: Stack) -> None:
    await stack.deploy(min_replica=0, max_replica=2)
    async with aiohttp.ClientSession() as s:
        status, _ = await _get(s, stack, "/sleep?s=0.01")
        assert status == 200
        # No traffic for the grace period: zero replicas, none running at all.
        await stack.until("scaled to zero", lambda: stack.live() == 0 and not stack.ready())
        view = (await stack.api.call("GET", f"{BASE}/versions/1/endpoint"))[1]
        assert view["status"] == "serving" and view["replicas"] == []
        # The first request at zero is held, not refused, and answered by a new replica.
        status, body = await _get(s, stack, "/sleep?s=0.01")
        assert status == 200, body
        assert len(stack.ready()) >= 1
        cold = stack.worker.metrics.activation("fraud", "scorer", "1").cold_start
        assert cold.count == 1 and cold.total > 0
    # The autoscaler's side is visible on the controller's /metrics.
    async with stack.api.session.get(stack.api.url + "/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    [started] = families["merlin_autoscaler_activations"].samples
    assert started.labels["version"] == "1" and started.value == 1.0
    reasons = {s.labels["reason"] for s in families["merlin_autoscaler_decisions"].samples}
    assert "idle: to zero" in reasons


async def test_scale_down_under_load_fails_no_request(stack: Stack) -> None:
    await stack.deploy(min_replica=1, max_replica=4)
    failures: list[tuple[int, str]] = []
    served = 0
    quiet = asyncio.Event()
    stop = asyncio.Event()

    async def client(s: aiohttp.ClientSession, steady: bool) -> None:
        nonlocal served
        # The steady client's requests are short: one client at concurrency ~1 sends
        # ~9/s of 0.1 s. (At 0.2 s it sent ~5/s, and the stable window's count is noisy
        # enough at 5/s that the policy's hysteresis, sizing for the rate plus two
        # standard deviations, kept a third replica until a chance lull: 5-20 s.)
        path = "/sleep?s=0.1" if steady else "/sleep?s=0.2"
        while not stop.is_set() and (steady or not quiet.is_set()):
            status, body = await _get(s, stack, path)
            served += 1
            if status != 200:
                failures.append((status, body))

    async with aiohttp.ClientSession() as s:
        steady = asyncio.ensure_future(client(s, True))
        burst = [asyncio.ensure_future(client(s, False)) for _ in range(5)]
        await stack.until("scaled up", lambda: len(stack.ready()) >= 3)
        quiet.set()  # the burst ends; one client keeps going while replicas drain away
        await asyncio.gather(*burst)
        # One client at concurrency ~1 needs ceil(1 / 0.7) = 2 replicas.
        await stack.until("scaled down", lambda: stack.live() <= 2, timeout=40)
        stop.set()
        await steady
    assert served > 20
    assert failures == []


async def test_activation_api_refuses_what_it_cannot_hand_on(stack: Stack) -> None:
    await stack.deploy(min_replica=0, max_replica=1)
    api = stack.api
    ok = {"project": "fraud", "model": "scorer", "version": "1", "waiting": 3}
    status, body, _ = await api.call("POST", "/v1/activations", ok)
    assert status == 202 and body == {"accepted": KEY, "waiting": 3}
    status, body, _ = await api.call("POST", "/v1/activations", {**ok, "version": "9"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, _ = await api.call("POST", "/v1/activations", {**ok, "waiting": -1})
    assert status == 422 and body["error"]["fields"][0]["path"] == "waiting"
    status, body, _ = await api.call("POST", "/v1/activations", b"{not json")
    assert status == 400
    stack.controller.activations = None
    status, body, _ = await api.call("POST", "/v1/activations", ok)
    assert status == 503 and body["error"]["code"] == "no_autoscaler"


async def _get(s: aiohttp.ClientSession, stack: Stack, path: str) -> tuple[int, str]:
    async with s.get(f"http://127.0.0.1:{stack.worker.port}{path}",
                     headers={"Host": HOST}) as r:  # fmt: skip
        return r.status, await r.text()


# --- the gateway owns the queue: open-loop load, long requests, periodic bursts --------


async def _poisson(
    s: aiohttp.ClientSession,
    stack: Stack,
    rate: float,
    seconds: float,
    path: str,
    seed: int = 1,
) -> list[int]:
    """Open-loop arrivals: a Poisson process at ``rate`` for ``seconds``, each request sent
    when it arrives whatever is in flight (closed-loop clients would bound the load by
    their count); the statuses, once all are answered."""
    import random

    rng = random.Random(seed)
    calls: list[asyncio.Future[tuple[int, str]]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    at = loop.time()
    while True:
        at += rng.expovariate(rate)
        if at >= end:
            break
        await asyncio.sleep(max(0.0, at - loop.time()))
        calls.append(asyncio.ensure_future(_get(s, stack, path)))
    return [status for status, _ in await asyncio.gather(*calls)]


async def _watch_desired(stack: Stack, into: list[int], stop: asyncio.Event) -> None:
    """What the autoscaler asks for, every 50 ms."""
    while not stop.is_set():
        scaler = stack.scaler.scalers.get(KEY)
        if scaler is not None:
            into.append(scaler.state.desired)
        await asyncio.sleep(0.05)


async def test_an_open_loop_burst_asks_for_what_it_needs_not_its_backlog(stack: Stack) -> None:
    # 40 requests/s of a 50 ms model, one request per replica at a time: 2 busy, so
    # ceil(2 / 0.7) = 3 replicas. While they start, requests queue in the gateway; sized
    # on that queue (Knative's concurrency), the burst would ask for many more.
    await stack.deploy(min_replica=1, max_replica=20, container_concurrency=1)
    needed = math.ceil(40 * 0.05 / 0.7)
    asked: list[int] = []
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_desired(stack, asked, stop))
    async with aiohttp.ClientSession() as s:
        statuses = await _poisson(s, stack, 40.0, 10.0, "/sleep?s=0.05")
    stop.set()
    await watcher
    assert statuses.count(200) == len(statuses) > 300
    assert max(asked) >= needed - 1  # it did scale for the burst
    # What the burst needs at the service time the gateway measured (a loaded machine
    # makes a 50 ms sleep take longer): sized on the queue, it would be many times that.
    # Poisson arrivals at 40/s reach 60/s over a window now and then, which asks for 5 of
    # the 3 (1.5x failed about one run in seven, before and after the HTTP front of
    # issue 19): 2x still tells a rate from a backlog.
    measured = stack.scaler.last_signals[KEY].service_time
    needed = max(needed, math.ceil(40 * measured / 0.7))
    assert max(asked) <= 2 * needed, (asked, measured)


# Deciding every 0.1 s: a poll that comes before the gateway closes the last second (read
# as nothing in service, one long request looked like a burst) is met 2.5x as often.
# Against the pre-fix SecondBuckets.last, 12 s at 0.25 s caught it in 2 runs of 12; this,
# 7 of 12.
@pytest.mark.parametrize("stack", [{"interval": 0.1}], indirect=True)
async def test_one_long_request_changes_no_scale(stack: Stack) -> None:
    # The defaults (concurrency, target 1, max 2): one request far longer than every
    # window (stable 4 s here: twice that) is one replica busy, not a burst.
    await stack.deploy(min_replica=1, max_replica=2)
    asked: list[int] = []
    live: list[int] = []
    stop = asyncio.Event()

    async def watch_live() -> None:
        while not stop.is_set():
            live.append(stack.live())
            await asyncio.sleep(0.05)

    watchers = [asyncio.ensure_future(_watch_desired(stack, asked, stop)),
                asyncio.ensure_future(watch_live())]  # fmt: skip
    async with aiohttp.ClientSession() as s:
        status, _ = await _get(s, stack, "/sleep?s=8")
        assert status == 200
        await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*watchers)
    assert len(asked) > 100 and set(asked) == {1}, stack.scaler.last_reason
    assert set(live) == {1}


async def test_a_periodic_burst_seen_twice_is_prewarmed_the_third_time(stack: Stack) -> None:
    # A trickle, and a batch caller's 4 s burst of 40 requests/s every 12 s from 3 s on:
    # after two bursts the forecast knows the period and orders the replicas one start-up
    # time ahead of the third. (The period is 1.5x FAST's shortest forecast period;
    # between two bursts, the windows bring the replicas back down before the forecast
    # raises them: checked below.)
    await stack.deploy(min_replica=1, max_replica=10, container_concurrency=1)
    period, width, first = 12.0, 4.0, 3.0
    needed = math.ceil(40 * 0.05 / 0.7)
    loop = asyncio.get_running_loop()
    began = loop.time()
    at_start: list[tuple[int, int]] = []  # per burst: (asked for, ready or starting)
    seen: list[str] = []  # per burst: what the last decision before it saw
    ended: list[float] = []  # per burst: when its last answer came
    live: list[tuple[float, int]] = []  # (when, ready or starting)
    stop = asyncio.Event()

    async def trickle(s: aiohttp.ClientSession) -> None:
        await _poisson(s, stack, 3.0, first + 2 * period + width, "/sleep?s=0.05", seed=2)

    async def bursts(s: aiohttp.ClientSession) -> list[int]:
        statuses: list[int] = []
        for k in range(3):
            await asyncio.sleep(max(0.0, began + first + k * period - loop.time()))
            at_start.append((stack.scaler.scalers[KEY].state.desired, stack.live()))
            last = stack.scaler.last_signals[KEY]
            seen.append(
                f"period={last.period} forecast={last.forecast_rate:.1f}/s "
                f"service={last.service_time:.3f}s startup={last.startup_time:.2f}s"
            )
            statuses += await _poisson(s, stack, 40.0, width, "/sleep?s=0.05", seed=10 + k)
            ended.append(loop.time())
        return statuses

    async def watch_live() -> None:
        while not stop.is_set():
            live.append((loop.time(), stack.live()))
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(watch_live())
    async with aiohttp.ClientSession() as s:
        _, statuses = await asyncio.gather(trickle(s), bursts(s))
    stop.set()
    await watcher
    assert statuses.count(200) == len(statuses)
    async with stack.api.session.get(stack.api.url + "/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    reasons = {s.labels["reason"]: s.value for s in families["merlin_autoscaler_decisions"].samples}
    assert reasons.get("forecast", 0) >= 1, reasons
    signals = {
        s.labels["metric"]: s.value for s in families["merlin_autoscaler_signal_value"].samples
    }
    assert signals.get("forecast_period_seconds") == pytest.approx(period, abs=1)
    # The first burst came unannounced; before the third, the forecast had asked for
    # what it needs, and they were ready or starting (how fast a process starts is the
    # machine's business, not the forecast's).
    assert at_start[0][0] < needed, (at_start, seen)
    assert at_start[2][0] >= needed and at_start[2][1] >= needed, (at_start, seen)
    # Those were ordered again for the third: after the second burst, fewer ran.
    third = began + first + 2 * period
    lull = [n for at, n in live if ended[1] <= at < third]
    assert lull and min(lull) < needed, (at_start, lull)
