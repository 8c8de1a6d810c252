"""Activation at zero in the gateway: requests for a version scaled to zero wait in a
bounded queue, the autoscaler is poked at once, and they go on as soon as a replica is
in the table — or get 503 with Retry-After past the bound or the deadline."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from merlin_dp.gateway.activation import ActivationLimits
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.exposition import render
from tests.conftest import Gateway, Replica, model_endpoint, start_replicas, version

HOST = "scorer.fraud.localhost"


class PokeSink:
    """What a controller would receive: every poke, over a real socket."""

    def __init__(self, status: int = 202) -> None:
        self.pokes: list[dict[str, Any]] = []
        self.status = status
        self.poked = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/activations", self._poke)
        self.replica = Replica("pokes", app)

    async def _poke(self, request: web.Request) -> web.Response:
        self.pokes.append(await request.json())
        self.poked.set()
        return web.json_response({}, status=self.status)

    async def start(self) -> str:
        await self.replica.start()
        return f"http://{self.replica.address}"


def at_zero(revision: int, replicas: list[str], scale_to_zero: bool = True) -> dict[str, Any]:
    return {
        "revision": revision,
        "version_endpoints": [
            version("fraud", "scorer", "1", replicas, scale_to_zero=scale_to_zero)
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100})],
    }


async def test_request_at_zero_waits_for_the_first_replica(
    gateway_factory: Any, replicas: list[Replica]
) -> None:
    sink = PokeSink()
    url = await sink.start()
    gw: Gateway = await gateway_factory(at_zero(1, []), GatewayConfig(activate_url=url))
    try:
        request = asyncio.ensure_future(_post(gw, b'{"instances": [1]}'))
        await asyncio.wait_for(sink.poked.wait(), 5)
        # Poked at once, with the version and how many wait; the request is still held.
        assert sink.pokes[0] == {"project": "fraud", "model": "scorer", "version": "1",
                                 "waiting": 1}  # fmt: skip
        assert not request.done()
        [replica] = await start_replicas(replicas, "v1")
        await gw.set_routes(at_zero(2, [replica.address]))
        status, headers, body = await asyncio.wait_for(request, 5)
        assert status == 200, body
        assert headers["X-Model-Version"] == "1"
        assert b'"served_by": "v1"' in body
        assert gw.worker is not None
        assert gw.worker.activator.waiting(("fraud", "scorer", "1")) == 0
        families = _families(gw)
        cold = families["gateway_cold_start_seconds"]
        count = [s.value for s in cold.samples if s.name.endswith("_count")]
        assert count == [1.0]
        held = {
            s.labels["result"]: s.value for s in families["gateway_activation_requests"].samples
        }
        assert held["held"] == 1.0 and held["timed_out"] == 0.0
    finally:
        await sink.replica.stop()


async def test_past_the_queue_bound_callers_get_503_with_retry_after(
    gateway_factory: Any,
) -> None:
    config = GatewayConfig(activation=ActivationLimits(max_waiting=2, timeout=30))
    gw: Gateway = await gateway_factory(at_zero(1, []), config)
    held = [asyncio.ensure_future(_post(gw, b"{}")) for _ in range(2)]
    assert gw.worker is not None
    for _ in range(200):
        if gw.worker.activator.waiting(("fraud", "scorer", "1")) == 2:
            break
        await asyncio.sleep(0.01)
    status, headers, body = await _post(gw, b"{}")
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert b"already wait" in body
    # The held ones learn the version went away when the table drops it: 503, not a hang.
    await gw.set_routes({"revision": 2})
    results = await asyncio.wait_for(asyncio.gather(*held), 5)
    assert [r[0] for r in results] == [503, 503]
    assert all(b"removed while starting" in r[2] for r in results)


async def test_past_the_deadline_callers_get_503_and_nothing_stays_queued(
    gateway_factory: Any,
) -> None:
    config = GatewayConfig(activation=ActivationLimits(timeout=0.3))
    gw: Gateway = await gateway_factory(at_zero(1, []), config)
    status, headers, body = await _post(gw, b"{}")
    assert status == 503 and headers["Retry-After"] == "1"
    assert b"did not start within 0.3 s" in body
    assert gw.worker is not None
    assert gw.worker.activator.waiting(("fraud", "scorer", "1")) == 0
    families = _families(gw)
    held = {s.labels["result"]: s.value for s in families["gateway_activation_requests"].samples}
    assert held["timed_out"] == 1.0


async def test_a_version_not_allowed_at_zero_is_refused_at_once(gateway_factory: Any) -> None:
    # Without scale_to_zero, no replicas means down (failed, or never ready): no waiting.
    config = GatewayConfig(activation=ActivationLimits(timeout=30))
    gw: Gateway = await gateway_factory(at_zero(1, [], scale_to_zero=False), config)
    status, _, body = await asyncio.wait_for(_post(gw, b"{}"), 5)
    assert status == 503 and b"no ready replica" in body


async def test_a_client_that_leaves_frees_its_place(gateway_factory: Any) -> None:
    sink = PokeSink(status=503)  # a poke that fails is counted and retried, not fatal
    url = await sink.start()
    limits = ActivationLimits(timeout=30, repoke_seconds=0.05)
    gw: Gateway = await gateway_factory(
        at_zero(1, []), GatewayConfig(activate_url=url, activation=limits)
    )
    try:
        request = asyncio.ensure_future(_post(gw, b"{}"))
        await asyncio.wait_for(sink.poked.wait(), 5)
        while len(sink.pokes) < 3:  # poked again while it waits
            await asyncio.sleep(0.02)
        request.cancel()
        assert gw.worker is not None
        key = ("fraud", "scorer", "1")
        for _ in range(200):
            if gw.worker.activator.waiting(key) == 0:
                break
            await asyncio.sleep(0.01)
        assert gw.worker.activator.waiting(key) == 0
        families = _families(gw)
        pokes = {s.labels["result"]: s.value for s in families["gateway_activation_pokes"].samples}
        assert pokes["error"] >= 3 and pokes["ok"] == 0
        # Nothing waits, so the pokes stop.
        await asyncio.sleep(0.3)
        seen = len(sink.pokes)
        await asyncio.sleep(0.3)
        assert len(sink.pokes) == seen
    finally:
        await sink.replica.stop()


async def _post(gw: Gateway, body: bytes) -> tuple[int, dict[str, str], bytes]:
    async with gw.request("POST", HOST, "/v1/predict", data=body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _families(gw: Gateway) -> dict[str, Any]:
    assert gw.worker is not None
    text = render(gw.worker.metrics.snapshot()).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}
