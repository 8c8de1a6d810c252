"""The autoscaler with real replicas, a real gateway and real signals: a load ramp
raises replicas, and the added ones serve."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp

from autoscaler.collector import GatewaySignals
from autoscaler.scaler import Autoscaler
from controller.server import ControllerConfig, start_controller
from gateway.admin import admin_app, start_admin
from gateway.aio import cancel_and_wait
from gateway.config import GatewayConfig
from gateway.sources import ControllerRouteSource
from gateway.worker import GatewayWorker, Report
from tests.conftest import ROOT
from tests.test_controller_api import BASE, Api

# The test replica, started under the contract: its port comes from CARAML_HTTP_PORT.
SLEEPY = [
    sys.executable, "-c",
    "import os, sys; sys.argv = ['x', '--port', os.environ['CARAML_HTTP_PORT']];"
    f"sys.path.insert(0, {str(ROOT)!r}); from tests.upstream_app import main; main()",
]  # fmt: skip


async def test_load_ramp_raises_replicas(tmp_path: Path) -> None:
    controller, runner, port = await start_controller(
        ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.2)
    )
    api = Api(f"http://127.0.0.1:{port}")
    worker = GatewayWorker(GatewayConfig(port=0), ControllerRouteSource(api.url))
    await worker.start()

    async def reports() -> list[Report]:
        return [worker.report()]

    admin, admin_port = await start_admin(admin_app(reports), "127.0.0.1", 0)
    assert controller.runtime is not None
    signals = GatewaySignals([f"http://127.0.0.1:{admin_port}"])
    scaler = Autoscaler(
        lambda: controller.state.versions, controller.runtime, signals, interval=0.5
    )
    scaling = asyncio.ensure_future(scaler.run())
    stop = asyncio.Event()
    try:
        spec = {
            "type": "custom",
            "command": SLEEPY,
            "resource_request": {"min_replica": 1, "max_replica": 4},
            "autoscaling_policy": {"metrics_type": "concurrency", "target_value": 1},
        }
        assert (await api.call("PUT", f"{BASE}/versions/1/endpoint", spec))[0] == 202
        await api.wait_status("1", "running")
        await api.call("PUT", f"{BASE}/endpoint",
                       {"rule": {"destinations": [{"version": "1", "weight": 100}]}})  # fmt: skip
        failures: list[int] = []

        async def client(s: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                async with s.get(f"http://127.0.0.1:{worker.port}/sleep?s=0.3",
                                 headers={"Host": "scorer.fraud.localhost"}) as r:  # fmt: skip
                    await r.read()
                    if r.status != 200:
                        failures.append(r.status)

        async with aiohttp.ClientSession() as s:
            clients = [asyncio.ensure_future(client(s)) for _ in range(6)]
            deadline = time.monotonic() + 30
            while len(controller.state.versions["fraud/scorer/1"].replicas) < 4:
                assert time.monotonic() < deadline, scaler.last_reason
                await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*clients)
        assert failures == []
        # The added replicas took traffic: the gateway's table has all four.
        assert len(worker.proxy.table.versions[0].upstreams) == 4
    finally:
        stop.set()
        await cancel_and_wait([scaling])
        await scaler.close()
        await admin.cleanup()
        await worker.stop()
        await api.session.close()
        await runner.cleanup()
        await controller.close()
