"""containerConcurrency: the gateway never sends a replica more than its limit, and
queues the rest in the version's FIFO, where the autoscaler can see them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from merlin_dp.common.net import free_port
from merlin_dp.gateway.activation import ActivationLimits
from merlin_dp.gateway.config import GatewayConfig
from tests.conftest import model_endpoint, start_replicas, version

HOST = "scorer.fraud.localhost"


def table(replicas: list[str], limit: int, revision: int = 0) -> dict[str, Any]:
    return {
        "revision": revision,
        "version_endpoints": [
            version("fraud", "scorer", "1", replicas, container_concurrency=limit)
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }


async def get(gw: Any, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    async with gw.request("GET", HOST, path) as r:
        return r.status, await r.json(), dict(r.headers)


async def peak(gw: Any, replica: Any) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://{replica.address}/peak") as r:
        return int((await r.json())["peak"])


async def test_a_replica_never_holds_more_than_its_limit(
    gateway_factory: Any, replicas: Any
) -> None:
    r1, r2 = await start_replicas(replicas, "a", "b")
    gw = await gateway_factory(table([r1.address, r2.address], limit=1))
    started = time.monotonic()
    answers = await asyncio.gather(*(get(gw, "/sleep?s=0.2") for _ in range(6)))
    elapsed = time.monotonic() - started
    assert [status for status, _, _ in answers] == [200] * 6
    assert await peak(gw, r1) == 1 and await peak(gw, r2) == 1
    # Six 0.2 s requests on two slots take three rounds; the queue held the rest.
    assert elapsed >= 0.55
    stats = gw.worker.metrics.activation("fraud", "scorer", "1")
    assert stats.queued >= 3 and stats.overflow == 0
    vs = gw.worker.metrics.version("fraud", "scorer", "1")
    assert vs.queued == 0 and vs.served == 6
    # Each exchange took about 0.2 s from dispatch: the queue's wait is not in it.
    assert 1.1 < vs.service_seconds < 1.8


async def test_no_limit_sends_everything_at_once(gateway_factory: Any, replicas: Any) -> None:
    (r1,) = await start_replicas(replicas, "a")
    gw = await gateway_factory(table([r1.address], limit=0))
    answers = await asyncio.gather(*(get(gw, "/sleep?s=0.2") for _ in range(5)))
    assert [status for status, _, _ in answers] == [200] * 5
    assert await peak(gw, r1) == 5
    assert gw.worker.metrics.activation("fraud", "scorer", "1").queued == 0


async def test_past_the_bound_the_caller_gets_503_with_retry_after(
    gateway_factory: Any, replicas: Any
) -> None:
    (r1,) = await start_replicas(replicas, "a")
    config = GatewayConfig(activation=ActivationLimits(max_waiting=2, timeout=5.0))
    gw = await gateway_factory(table([r1.address], limit=1), config)
    answers = await asyncio.gather(*(get(gw, "/sleep?s=0.3") for _ in range(5)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200, 200, 200, 503, 503]  # 1 served + 2 queued; 2 refused
    for status, body, headers in answers:
        if status == 503:
            assert headers["Retry-After"] == "1" and "X-Request-ID" in headers
            assert "limit of 1" in body["error"]["message"]
            assert "2 requests already wait" in body["error"]["message"]
    assert gw.worker.metrics.activation("fraud", "scorer", "1").overflow == 2


async def test_past_the_deadline_the_caller_gets_503(gateway_factory: Any, replicas: Any) -> None:
    (r1,) = await start_replicas(replicas, "a")
    config = GatewayConfig(activation=ActivationLimits(timeout=0.2))
    gw = await gateway_factory(table([r1.address], limit=1), config)
    slow = asyncio.ensure_future(get(gw, "/sleep?s=1.0"))
    await asyncio.sleep(0.1)
    status, body, headers = await get(gw, "/sleep?s=0.01")
    assert status == 503 and "free slot within 0.2 s" in body["error"]["message"]
    assert headers["Retry-After"] == "1"
    assert (await slow)[0] == 200
    # The slot was not lost: the next request is served at once.
    assert (await get(gw, "/sleep?s=0.01"))[0] == 200


async def test_a_client_that_leaves_the_queue_gives_up_its_place(
    gateway_factory: Any, replicas: Any
) -> None:
    (r1,) = await start_replicas(replicas, "a")
    gw = await gateway_factory(table([r1.address], limit=1))
    slow = asyncio.ensure_future(get(gw, "/sleep?s=0.5"))
    await asyncio.sleep(0.1)
    leaver = asyncio.ensure_future(get(gw, "/sleep?s=5"))  # waits behind slow, then leaves
    await asyncio.sleep(0.1)
    vs = gw.worker.metrics.version("fraud", "scorer", "1")
    assert vs.queued == 1
    leaver.cancel()
    await asyncio.sleep(0.1)
    assert vs.queued == 0
    assert (await slow)[0] == 200
    # The replica is free again and nobody holds its slot: served without waiting.
    started = time.monotonic()
    assert (await get(gw, "/sleep?s=0.01"))[0] == 200
    assert time.monotonic() - started < 1.0
    assert await peak(gw, r1) == 1


async def test_a_new_replica_takes_the_queue(gateway_factory: Any, replicas: Any) -> None:
    r1, r2 = await start_replicas(replicas, "a", "b")
    gw = await gateway_factory(table([r1.address], limit=1))
    calls = [asyncio.ensure_future(get(gw, "/sleep?s=1.0")) for _ in range(3)]
    await asyncio.sleep(0.2)
    assert gw.worker.metrics.version("fraud", "scorer", "1").queued == 2
    await gw.set_routes(table([r1.address, r2.address], limit=1, revision=1))
    await asyncio.sleep(0.1)
    # One waiter went to the new replica at once; the other still waits for a slot.
    assert gw.worker.metrics.version("fraud", "scorer", "1").queued == 1
    answers = await asyncio.gather(*calls)
    assert {body["served_by"] for _, body, _ in answers} == {"a", "b"}
    assert await peak(gw, r1) == 1 and await peak(gw, r2) == 1


async def test_a_retry_waits_for_a_slot_rather_than_failing(
    gateway_factory: Any, replicas: Any
) -> None:
    # One replica refuses connections; the other serves one request at a time. A request
    # sent to the dead one first is retried, and waits its turn on the live one.
    (live,) = await start_replicas(replicas, "a")
    dead = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory(table([dead, live.address], limit=1))
    answers = await asyncio.gather(*(get(gw, "/sleep?s=0.1") for _ in range(6)))
    assert [status for status, _, _ in answers] == [200] * 6
    assert await peak(gw, live) == 1


async def test_mirror_copies_never_pass_the_mirrored_versions_limit(
    gateway_factory: Any, replicas: Any
) -> None:
    # Version 2 is mirrored 100% and serves one request at a time: copies that find its
    # replica busy are dropped (counted), never queued, and never sent past the limit.
    prod, cand = await start_replicas(replicas, "prod", "cand")
    gw = await gateway_factory({
        "version_endpoints": [
            version("fraud", "scorer", "1", [prod.address]),
            version("fraud", "scorer", "2", [cand.address], container_concurrency=1),
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100, "2": 0},
                                           mirror={"version": "2", "percent": 100})],
    })  # fmt: skip
    answers = await asyncio.gather(*(get(gw, "/sleep?s=0.2") for _ in range(5)))
    assert [status for status, _, _ in answers] == [200] * 5
    await asyncio.sleep(0.5)  # the copies end
    assert await peak(gw, cand) == 1
    assert await peak(gw, prod) == 5
    results = gw.worker.metrics.mirror("fraud", "scorer", "2").results
    assert results.get("dropped|full", 0) >= 3 and results.get("sent|", 0) >= 1, results
