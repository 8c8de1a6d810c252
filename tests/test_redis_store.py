"""Several controllers sharing state through a real redis-server, gateways following
Redis, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from merlin_dp.controller.server import ControllerConfig, start_controller
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import RedisRouteSource
from merlin_dp.gateway.worker import GatewayWorker
from tests.conftest import RedisServer
from tests.test_controller_api import BASE, Api, deployment


@pytest.fixture
async def two_controllers(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Any]:
    """A runs replicas; B only serves the API. Both share state through Redis."""
    made = []
    apis = []
    for name, runtime in (("a", "local"), ("b", "none")):
        config = ControllerConfig(state_dir=tmp_path / name, port=0, runtime=runtime,
                                  store=redis_server.url, drain_seconds=0.2)  # fmt: skip
        controller, runner, port = await start_controller(config)
        made.append((controller, runner))
        api = Api(f"http://127.0.0.1:{port}")
        api.controller = controller  # type: ignore[attr-defined]
        apis.append(api)
    yield apis
    for api in apis:
        await api.session.close()
    for controller, runner in made:
        await runner.cleanup()
        await controller.close()


async def until(check: Any, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never happened")


async def test_controllers_share_state_and_refuse_stale_writers(two_controllers: Any) -> None:
    a, b = two_controllers
    for v in ("1", "2"):
        status, body, _ = await a.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment())
        assert status == 202, body
    for v in ("1", "2"):
        await a.wait_status(v, "running")
    # B sees the versions A deployed (it reloads under the lease) and can route to them.
    only_1 = {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    status, body, _ = await b.call("PUT", f"{BASE}/endpoint", only_1)
    assert status == 201, body
    seen = body["revision"]

    async def a_sees_it() -> bool:
        status, got, _ = await a.call("GET", f"{BASE}/endpoint")
        return bool(status == 200 and got["revision"] == seen)

    await until(a_sees_it)
    # Both read revision `seen`; A's write lands, B's (If-Match `seen`) is stale.
    rule = {
        "rule": {"destinations": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]}
    }
    ok, _, _ = await a.call("PUT", f"{BASE}/endpoint", rule, **{"If-Match": str(seen)})
    stale, body, _ = await b.call("PUT", f"{BASE}/endpoint", rule, **{"If-Match": str(seen)})
    assert (ok, stale) == (200, 412), body


async def test_the_controller_with_the_runtime_runs_what_another_accepted(
    two_controllers: Any,
) -> None:
    a, b = two_controllers
    status, body, _ = await b.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    assert status == 202, body
    # B has no runtime; A follows the shared state, starts the replica, reports it running.
    body = await b.wait_status("1", "running")
    assert body["replicas"]
    assert (await b.call("DELETE", f"{BASE}/versions/1/endpoint"))[0] == 200

    async def stopped() -> bool:
        return not a.controller.runtime.replicas("fraud/scorer/1")

    await until(stopped)


async def test_concurrent_writers_lose_no_update(two_controllers: Any) -> None:
    a, b = two_controllers
    for v in ("1", "2"):
        await a.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment())
    for v in ("1", "2"):
        await a.wait_status(v, "running")

    def rule(w: int) -> dict[str, Any]:
        return {"rule": {"destinations": [{"version": "1", "weight": w},
                                          {"version": "2", "weight": 100 - w}]}}  # fmt: skip

    results = await asyncio.gather(
        *(api.call("PUT", f"{BASE}/endpoint", rule(w)) for w in range(0, 100, 5)
          for api in (a, b))
    )  # fmt: skip
    assert all(status in (200, 201) for status, _, _ in results)
    _, history, _ = await a.call("GET", f"{BASE}/endpoint/history")
    revisions = [h["revision"] for h in history["history"]]
    assert len(revisions) == 40 and revisions == sorted(set(revisions))


async def test_gateway_follows_redis_and_rides_out_an_outage(
    two_controllers: Any, redis_server: RedisServer
) -> None:
    a, b = two_controllers
    await a.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    await a.wait_status("1", "running")
    await a.call(
        "PUT", f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    )
    source = RedisRouteSource(redis_server.url)
    worker = GatewayWorker(GatewayConfig(port=0), source)
    await worker.start()
    url = f"http://127.0.0.1:{worker.port}/v1/predict"
    headers = {"Host": "scorer.fraud.localhost"}
    try:
        async with aiohttp.ClientSession() as s:

            async def serves() -> bool:
                async with s.post(url, json={"instances": [[1]]}, headers=headers) as r:
                    await r.read()
                    return r.status == 200

            await until(serves)
            redis_server.kill()
            await until(lambda: _now(lambda: not source.connected))
            # Writes are refused whole; reads answer from memory; traffic flows on.
            only_1 = {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
            status, body, _ = await b.call("PUT", f"{BASE}/endpoint", only_1)
            assert status == 503 and body["error"]["code"] == "store_unavailable"
            assert (await b.call("GET", f"{BASE}/endpoint"))[0] == 200
            assert await serves()
            before = a.controller.state.revision
            redis_server.start()  # the append-only file brings the state back
            await until(lambda: _now(lambda: source.connected))
            status, body, _ = await b.call("PUT", f"{BASE}/versions/2/endpoint", deployment())
            assert status == 202, body
            await until(lambda: _now(lambda: worker.proxy.table.revision > before))
            assert await serves()
    finally:
        await worker.stop()


async def _now(check: Any) -> bool:
    return bool(check())
