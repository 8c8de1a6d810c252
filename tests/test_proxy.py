"""The HTTP_JSON data path over real sockets: lookup, rewrite, headers, balancing,
retries, ejection and timeouts."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import pytest
from aiohttp import web

from merlin_dp.common.net import free_port
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.pool.upstream import PoolLimits
from tests.conftest import Replica, model_endpoint, start_replicas, version

# Ejection, back-off and timeouts here are judged on real clocks, with the gateway and the
# replicas on one event loop: a neighbour's CPU stretches them. The test command runs
# these alone.
pytestmark = pytest.mark.alone


def two_versions(v1: list[str], v2: list[str], **rule: Any) -> dict[str, Any]:
    return {
        "version_endpoints": [
            version("fraud", "scorer", "1", v1),
            version("fraud", "scorer", "2", v2),
        ],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100, "2": 0}, **rule)],
    }


async def test_model_endpoint_rewrites_predict_paths(gateway_factory: Any, replicas: Any) -> None:
    (r1, r2) = await start_replicas(replicas, "v1", "v2")
    gw = await gateway_factory(two_versions([r1.address], [r2.address]))
    for path in ("/v1/predict", "/v1/models/scorer:predict"):
        async with gw.request("POST", "scorer.fraud.localhost", path, json={"x": 1}) as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["path"] == "/v1/models/scorer-1:predict"
            assert body["served_by"] == "v1"
            assert resp.headers["X-Model-Version"] == "1"
    # Query strings survive the rewrite; other paths pass through unchanged.
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict?debug=1") as resp:
        assert (await resp.json())["path"] == "/v1/models/scorer-1:predict?debug=1"
    async with gw.request("GET", "scorer.fraud.localhost", "/v1/models/scorer-1") as resp:
        assert (await resp.json())["ready"] is True


async def test_model_endpoint_rewrites_kserve_v1_and_v2_paths(
    gateway_factory: Any, replicas: Any
) -> None:
    async def path_of(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"path": request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", path_of)
    rep = await Replica("any", app).start()
    replicas.append(rep)
    gw = await gateway_factory(two_versions([rep.address], [rep.address]))
    rewritten = {
        ("GET", "/v1/models/scorer"): "/v1/models/scorer-1",
        ("POST", "/v2/models/scorer/infer"): "/v2/models/scorer-1/infer",
        ("GET", "/v2/models/scorer/ready"): "/v2/models/scorer-1/ready",
        ("GET", "/v2/models/scorer"): "/v2/models/scorer-1",
        # Server-wide paths name no model; V2's versions/<v> paths aren't rewritten.
        ("GET", "/"): "/",
        ("GET", "/v2"): "/v2",
        ("GET", "/v2/health/ready"): "/v2/health/ready",
        ("POST", "/v2/models/scorer/versions/2/infer"): "/v2/models/scorer/versions/2/infer",
        ("GET", "/v2/models/other/ready"): "/v2/models/other/ready",
    }
    for (method, path), upstream in rewritten.items():
        for query in ("", "?a=1"):
            async with gw.request(method, "scorer.fraud.localhost", path + query) as resp:
                assert (await resp.json())["path"] == upstream + query, path
            async with gw.request(method, "gw", f"/serving/fraud/scorer{path}{query}") as resp:
                assert (await resp.json())["path"] == upstream + query, path
    # A version endpoint is called by its own name: only /v1/predict is rewritten there.
    for path in ("/v2/models/scorer-2/infer", "/v2/models/scorer/infer", "/v1/models/scorer"):
        async with gw.request("POST", "scorer-2.fraud.localhost", path) as resp:
            assert (await resp.json())["path"] == path


async def test_version_endpoint_host_passes_path_through(
    gateway_factory: Any, replicas: Any
) -> None:
    (r1, r2) = await start_replicas(replicas, "v1", "v2")
    gw = await gateway_factory(two_versions([r1.address], [r2.address]))
    async with gw.request(
        "POST", "scorer-2.fraud.localhost:8080", "/v1/models/scorer-2:predict"
    ) as resp:
        body = await resp.json()
        assert body["served_by"] == "v2"
        assert body["path"] == "/v1/models/scorer-2:predict"
        assert resp.headers["X-Model-Version"] == "2"
    # Host names are case-insensitive; /v1/predict is a predict call here too, and other
    # paths pass through unchanged.
    async with gw.request("POST", "SCORER-2.Fraud.LOCALHOST", "/v1/predict?x=1") as resp:
        assert (await resp.json())["path"] == "/v1/models/scorer-2:predict?x=1"
    async with gw.request("GET", "scorer-2.fraud.localhost", "/metrics/custom") as resp:
        assert (await resp.json())["path"] == "/metrics/custom"


async def test_path_form_for_clients_without_dns(gateway_factory: Any, replicas: Any) -> None:
    (r1, r2) = await start_replicas(replicas, "v1", "v2")
    gw = await gateway_factory(two_versions([r1.address], [r2.address]))
    async with gw.request("POST", "127.0.0.1", "/serving/fraud/scorer/v1/predict?a=b") as resp:
        body = await resp.json()
        assert body["path"] == "/v1/models/scorer-1:predict?a=b"
    async with gw.request(
        "POST", "127.0.0.1", "/serving/fraud/scorer-2/v1/models/scorer-2:predict"
    ) as resp:
        assert (await resp.json())["served_by"] == "v2"


async def test_forwarding_headers(gateway_factory: Any, replicas: Any) -> None:
    (r1, r2) = await start_replicas(replicas, "v1", "v2")
    gw = await gateway_factory(two_versions([r1.address], [r2.address]))
    headers = {
        "X-Forwarded-For": "203.0.113.9",
        "X-Request-Id": "req-123",
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop-by-hop by Connection",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Custom": "kept",
    }
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict", headers=headers) as resp:
        seen = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert resp.headers["X-Request-Id"] == "req-123"
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-request-id"] == "req-123"
    assert seen["x-custom"] == "kept"
    assert seen["host"] == "scorer.fraud.localhost"
    for gone in ("x-secret", "keep-alive", "te"):
        assert gone not in seen
    # Without an id, the gateway makes one and returns it.
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
        rid = resp.headers["X-Request-Id"]
        echoed = {k.lower(): v for k, v in (await resp.json())["headers"].items()}
        assert rid and echoed["x-request-id"] == rid


async def test_response_hop_by_hop_headers_dropped(gateway_factory: Any, replicas: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text="ok", headers={"Connection": "keep-alive", "Keep-Alive": "timeout=9", "X-App": "1"}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    rep = await Replica("odd", app).start()
    replicas.append(rep)
    gw = await gateway_factory(two_versions([rep.address], [rep.address]))
    async with gw.request("GET", "scorer.fraud.localhost", "/x") as resp:
        assert resp.headers["X-App"] == "1"
        assert "Keep-Alive" not in resp.headers
        assert await resp.text() == "ok"


async def test_head_and_chunked_responses(gateway_factory: Any, replicas: Any) -> None:
    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(two_versions([r1.address], [r1.address]))
    async with gw.request("HEAD", "scorer.fraud.localhost", "/anything") as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    # A chunked (unknown-length) response streams back whole.
    async with gw.request("GET", "scorer.fraud.localhost", "/big?bytes=300000") as resp:
        assert len(await resp.read()) == 300000
    async with gw.request("GET", "scorer.fraud.localhost", "/big?bytes=5000&length=1") as resp:
        assert resp.headers["Content-Length"] == "5000"
        assert len(await resp.read()) == 5000


async def test_least_outstanding_avoids_the_busy_replica(
    gateway_factory: Any, replicas: Any
) -> None:
    gate = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"served_by": "slow"})

    slow_app = web.Application()
    slow_app.router.add_route("*", "/{tail:.*}", stuck)
    slow = await Replica("slow", slow_app).start()
    replicas.append(slow)
    (fast,) = await start_replicas(replicas, "fast")
    gw = await gateway_factory(two_versions([slow.address, fast.address], [fast.address]))
    # Five requests pile up on the slow replica at most before P2C steers around it.
    pending = [
        asyncio.ensure_future(
            gw.request("POST", "scorer.fraud.localhost", "/v1/predict").__aenter__()
        )
        for _ in range(40)
    ]
    done, _ = await asyncio.wait(pending, timeout=3)
    served = Counter([(await d.result().json())["served_by"] for d in done])
    gate.set()
    for p in pending:
        resp = await p
        resp.release()
    assert served["fast"] >= 30


async def test_balancing_spreads_load(gateway_factory: Any, replicas: Any) -> None:
    reps = await start_replicas(replicas, "a", "b", "c")
    gw = await gateway_factory(two_versions([r.address for r in reps], [reps[0].address]))

    async def one() -> str:
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
            return str((await resp.json())["served_by"])

    served = Counter(await asyncio.gather(*(one() for _ in range(300))))
    assert set(served) == {"a", "b", "c"}
    assert min(served.values()) >= 40


async def test_refused_connect_is_retried_elsewhere(gateway_factory: Any, replicas: Any) -> None:
    (good,) = await start_replicas(replicas, "good")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    gw = await gateway_factory(two_versions([dead, good.address], [good.address]))
    for _ in range(30):
        async with gw.request(
            "POST", "scorer.fraud.localhost", "/v1/predict", data=b"x" * 100
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["served_by"] == "good"
    assert gw.worker.registry.stats.retries > 0
    assert gw.worker.registry.stats.errors["connect"] > 0


def resetting_app(counter: Counter[str]) -> web.Application:
    """A replica that reads the request, then closes without answering (as one that
    crashes mid-request does: the kernel closes its socket with FIN)."""

    async def reset(request: web.Request) -> web.Response:
        await request.read()
        counter["seen"] += 1
        assert request.transport is not None
        request.transport.close()
        raise ConnectionResetError

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reset)
    return app


async def test_request_that_reached_upstream_is_not_replayed(
    gateway_factory: Any, replicas: Any
) -> None:
    seen: Counter[str] = Counter()
    bad = await Replica("bad", resetting_app(seen)).start()
    replicas.append(bad)
    gw = await gateway_factory(two_versions([bad.address], [bad.address]))
    async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict", data=b"{}") as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
        assert err["code"] == "bad_gateway"
    assert seen["seen"] == 1  # sent once, never replayed


async def test_idempotent_route_replays_on_another_replica(
    gateway_factory: Any, replicas: Any
) -> None:
    seen: Counter[str] = Counter()
    bad = await Replica("bad", resetting_app(seen)).start()
    replicas.append(bad)
    (good,) = await start_replicas(replicas, "good")
    spec = two_versions([bad.address, good.address], [good.address], idempotent=True)
    gw = await gateway_factory(spec)
    for _ in range(20):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict", data=b"{}") as resp:
            assert resp.status == 200
            assert (await resp.json())["served_by"] == "good"
    assert seen["seen"] >= 1


async def test_failing_replica_is_ejected(gateway_factory: Any, replicas: Any) -> None:
    hits: Counter[str] = Counter()

    async def broken(request: web.Request) -> web.Response:
        hits["broken"] += 1
        return web.json_response({"served_by": "broken"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", broken)
    bad = await Replica("broken", app).start()
    replicas.append(bad)
    (good,) = await start_replicas(replicas, "good")
    config = GatewayConfig(pool=PoolLimits(eject_after=3, eject_base_seconds=30))
    gw = await gateway_factory(two_versions([bad.address, good.address], [good.address]), config)
    statuses: Counter[int] = Counter()
    for _ in range(200):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
            statuses[resp.status] += 1
    # Three 5xx in a row eject it; after that it gets nothing.
    assert hits["broken"] == 3
    assert statuses[500] == 3
    assert gw.worker.registry.stats.ejections == 1


async def test_ejected_replica_returns_after_backoff(gateway_factory: Any, replicas: Any) -> None:
    (good,) = await start_replicas(replicas, "good")
    # Bound but not listening: connects are refused, and no other process can take the
    # port meanwhile (a free port another test's server took once made this pass nothing).
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    config = GatewayConfig(pool=PoolLimits(eject_after=2, eject_base_seconds=0.3))
    gw = await gateway_factory(
        two_versions([f"127.0.0.1:{port}", good.address], [good.address]), config
    )
    for _ in range(20):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
            assert resp.status == 200
    assert gw.worker.registry.stats.ejections >= 1
    dead.close()
    revived = await Replica("revived").start(port)
    replicas.append(revived)
    await asyncio.sleep(0.5)
    served: Counter[str] = Counter()
    for _ in range(60):
        async with gw.request("POST", "scorer.fraud.localhost", "/v1/predict") as resp:
            served[(await resp.json())["served_by"]] += 1
    assert served["revived"] > 0


async def test_timeout_answers_504(gateway_factory: Any, replicas: Any) -> None:
    (r1,) = await start_replicas(replicas, "sleepy")
    gw = await gateway_factory(two_versions([r1.address], [r1.address], timeout_seconds=0.3))
    async with gw.request("GET", "scorer.fraud.localhost", "/sleep?s=3") as resp:
        assert resp.status == 504
        body = await resp.json()
        assert body["error"]["code"] == "upstream_timeout"
        assert resp.headers["X-Model-Version"] == "1"
    assert gw.worker.registry.stats.errors["timeout"] == 1
    # The next request on the same route is fine.
    async with gw.request("GET", "scorer.fraud.localhost", "/sleep?s=0.01") as resp:
        assert resp.status == 200


async def test_small_chunked_answer_is_relayed_with_a_length(
    gateway_factory: Any, replicas: Any
) -> None:
    from tests.test_bad_inputs import raw_exchange

    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(two_versions([r1.address], [r1.address]))
    request = b"GET /big?bytes=1000 HTTP/1.1\r\nHost: scorer.fraud.localhost\r\n\r\n"
    status, headers, body = await raw_exchange(gw.port, request)
    assert status == 200
    assert headers["content-length"] == "1000"
    assert "transfer-encoding" not in headers
    assert headers["x-model-version"] == "1"
    assert body == b"x" * 1000


async def test_http10_client(gateway_factory: Any, replicas: Any) -> None:
    import asyncio as aio

    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(two_versions([r1.address], [r1.address]))
    reader, writer = await aio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /v1/predict HTTP/1.0\r\nHost: scorer.fraud.localhost\r\n"
                 b"Content-Length: 2\r\n\r\n{}")  # fmt: skip
    raw = await aio.wait_for(reader.read(), 10)  # 1.0 without keep-alive: closed after
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"X-Model-Version: 1" in head
    assert b'"served_by": "v1"' in body


async def test_expect_100_continue(gateway_factory: Any, replicas: Any) -> None:
    import asyncio as aio

    (r1,) = await start_replicas(replicas, "v1")
    gw = await gateway_factory(two_versions([r1.address], [r1.address]))
    reader, writer = await aio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: scorer.fraud.localhost\r\n"
                 b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
    interim = await aio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"{}")
    head = await aio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200")
