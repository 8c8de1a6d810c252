"""Controller, local runtime and gateway together, under load: a replica killed, and
scaling up and down, as users see it through the stable URL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from merlin_dp.controller.server import ControllerConfig, start_controller
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import ControllerRouteSource
from merlin_dp.gateway.worker import GatewayWorker
from tests.test_controller_api import BASE, Api, deployment

# A killed replica may cost only the requests it held: under a neighbour's CPU load more
# of them are in flight when it dies. The test command runs these alone.
pytestmark = pytest.mark.alone

KEY = "fraud/scorer/1"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Any]:
    controller, runner, port = await start_controller(
        ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.5)
    )
    api = Api(f"http://127.0.0.1:{port}")
    await api.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    await api.wait_status("1", "running")
    await api.call(
        "PUT", f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    )
    worker = GatewayWorker(GatewayConfig(port=0), ControllerRouteSource(api.url))
    await worker.start()
    await until(lambda: worker.proxy.table.revision == controller.state.revision)
    yield controller, worker
    await worker.stop()
    await api.session.close()
    await runner.cleanup()
    await controller.close()


async def load(port: int, stop: asyncio.Event, clients: int = 8) -> tuple[int, list[str]]:
    ok = 0
    failures: list[str] = []
    url = f"http://127.0.0.1:{port}/v1/predict"

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal ok
        while not stop.is_set():
            async with s.post(url, json={"instances": [[1, 2]]},
                              headers={"Host": "scorer.fraud.localhost"}) as r:  # fmt: skip
                body = await r.read()
                if r.status == 200:
                    ok += 1
                else:
                    failures.append(f"{r.status} {body[:120]!r}")

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s) for _ in range(clients)))
    return ok, failures


async def until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)


def ready(controller: Any) -> int:
    return len(controller.state.versions[KEY].replicas)


async def test_scale_up_and_down_under_load_fails_nothing(stack: Any) -> None:
    controller, worker = stack
    stop = asyncio.Event()
    traffic = asyncio.ensure_future(load(worker.port, stop))
    await asyncio.sleep(0.5)
    await controller.runtime.scale(KEY, 3)
    await until(lambda: ready(controller) == 3)
    await until(lambda: len(worker.proxy.table.versions[0].upstreams) == 3)
    await asyncio.sleep(0.5)
    await controller.runtime.scale(KEY, 1)
    await until(lambda: len(controller.runtime.replicas(KEY)) == 1)
    await asyncio.sleep(0.5)
    stop.set()
    ok, failures = await traffic
    assert ok > 100
    assert failures == []


async def test_killed_replica_is_restarted_and_costs_only_in_flight(stack: Any) -> None:
    controller, worker = stack
    await controller.runtime.scale(KEY, 2)
    await until(lambda: ready(controller) == 2)
    await until(lambda: len(worker.proxy.table.versions[0].upstreams) == 2)
    stop = asyncio.Event()
    traffic = asyncio.ensure_future(load(worker.port, stop))
    await asyncio.sleep(0.5)
    victim = controller.runtime.replicas(KEY)[0]
    port = int(victim.address.rsplit(":", 1)[1])
    up = next(u for u in worker.proxy.table.versions[0].upstreams if u.port == port)
    in_flight = up.outstanding  # read and kill with no await between
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    # The runtime restarts it; it rejoins the table once ready.
    await until(lambda: any(r.restarts == 1 and r.state == "ready"
                            for r in controller.runtime.replicas(KEY)))  # fmt: skip
    await until(lambda: ready(controller) == 2)
    await asyncio.sleep(0.5)
    stop.set()
    ok, failures = await traffic
    assert ok > 100
    assert len(failures) <= in_flight, (failures, in_flight)
