"""Signals through Redis: gateways push the seconds they close to a stream, the
autoscaler reads and sums them without knowing any gateway's address, and a gateway that
goes quiet is first missing (hold) and then forgotten."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from merlin_dp.autoscaler.collector import RedisSignals
from merlin_dp.gateway.config import GatewayConfig
from tests.conftest import (
    Gateway,
    RedisServer,
    Replica,
    model_endpoint,
    start_replicas,
    version,
)

HOST = "scorer.fraud.localhost"


async def test_gateways_push_and_the_autoscaler_sums_them(
    tmp_path: Path,
    redis_server: RedisServer,
    replicas: list[Replica],
) -> None:
    [r1] = await start_replicas(replicas, "r1")
    spec = {
        "version_endpoints": [version("fraud", "scorer", "1", [r1.address])],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }
    config = GatewayConfig(redis_url=redis_server.url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await Gateway(tmp_path / "a", config).start(spec)
    b = await Gateway(tmp_path / "b", config).start(spec)
    reader = RedisSignals(redis_server.url, fresh_s=2.5, forget_s=5.0)
    try:
        for gw, n in ((a, 10), (b, 5)):
            for _ in range(n):
                async with gw.request("GET", HOST, "/x") as resp:
                    assert resp.status == 200
        # Both gateways close the second and push it within about two seconds.
        total = 0.0
        for _ in range(60):
            await asyncio.sleep(0.1)
            now = time.time()
            answered, expected = await reader.poll(now)
            rps = reader.series(("fraud", "scorer", "1")).requests
            total = rps.average(now, 10) * 10  # every request of the last 10 s
            if round(total) == 15 and answered == 2:
                break
        assert round(total) == 15
        assert (answered, expected) == (2, 2)
        # Gateway b stops: first missing (expected, not answering: the scaler holds)...
        await b.stop()
        await asyncio.sleep(3.0)
        answered, expected = await reader.poll(time.time())
        assert (answered, expected) == (1, 2)
        # ...then forgotten, as a gateway replica that scaled away.
        await asyncio.sleep(2.5)
        answered, expected = await reader.poll(time.time())
        assert (answered, expected) == (1, 1)
        # Redis away: no exception, nobody answered, the failure is counted.
        redis_server.kill()
        answered, expected = await reader.poll(time.time())
        assert answered == 0 and expected >= 1
        assert reader.failures[redis_server.url] == 1
    finally:
        await reader.close()
        await a.stop()
        await b.stop()
