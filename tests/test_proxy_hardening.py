"""Regressions for framing, pooling and blame bugs found in review: each case failed
before its fix."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.upstream import PoolLimits
from tests.conftest import Replica, model_endpoint, version
from tests.test_bad_inputs import raw_exchange

HOST = b"scorer.fraud.localhost"


def spec(address: str, **rule: Any) -> dict[str, Any]:
    return {
        "version_endpoints": [version("fraud", "scorer", "1", [address])],
        "model_endpoints": [model_endpoint("fraud", "scorer", {"1": 100}, **rule)],
    }


def recording_app(seen: list[tuple[str, str, int]]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((request.method, request.path, len(body)))
        return web.Response(text=f"{request.method} {request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def test_connection_cannot_strip_framing_headers(gateway_factory: Any, replicas: Any) -> None:
    seen: list[tuple[str, str, int]] = []
    rep = await Replica("rec", recording_app(seen)).start()
    replicas.append(rep)
    gw = await gateway_factory(spec(rep.address))
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    attack = (b"POST /v1/predict HTTP/1.1\r\nHost: " + HOST
              + b"\r\nConnection: content-length, host"
              + b"\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)  # fmt: skip
    status, _, _ = await raw_exchange(gw.port, attack)
    assert status == 200
    innocent = b"GET /innocent HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    _, _, body = await raw_exchange(gw.port, innocent)
    assert body == b"GET /innocent"
    assert ("GET", "/smuggled", 0) not in seen
    assert seen[0] == ("POST", "/v1/models/scorer-1:predict", len(smuggled))


async def test_bytes_outside_an_exchange_retire_the_connection(gateway_factory: Any) -> None:
    """A replica that sends two answers to one request must not have the second one
    delivered to the next client."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")  # fmt: skip
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await gateway_factory(spec(f"127.0.0.1:{port}"))
        bodies = []
        for _ in range(5):
            async with gw.request("GET", "scorer.fraud.localhost", "/x") as resp:
                bodies.append(await resp.read())
        assert bodies == [b"first"] * 5
    finally:
        server.close()


async def test_half_sent_upload_never_goes_back_to_the_pool(gateway_factory: Any) -> None:
    """A replica answering early, before the (streamed) upload ends: the connection is spent."""
    requests_seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            requests_seen.append(head.split(b"\r\n", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
            await writer.drain()  # and never read the body

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        from gateway.proxy import ProxyLimits

        config = GatewayConfig(proxy=ProxyLimits(buffer_body_bytes=1024))
        gw = await gateway_factory(spec(f"127.0.0.1:{port}"), config)
        big = b"u" * 200_000  # over the buffer: streamed
        async with gw.request("POST", "scorer.fraud.localhost", "/upload", data=big) as resp:
            assert await resp.read() == b"early"
        for _ in range(3):
            async with gw.request("GET", "scorer.fraud.localhost", "/next") as resp:
                assert resp.status == 200 and await resp.read() == b"early"
        assert requests_seen[1:] == [b"GET /next HTTP/1.1"] * 3
        up = gw.worker.proxy.table.versions[0].upstreams[0]
        assert up.outstanding == 0 and not gw.worker.registry.busy
    finally:
        server.close()


async def test_stale_pooled_connection_is_retried_fresh_on_the_same_replica(
    gateway_factory: Any,
) -> None:
    """The only replica resets each connection when a second request arrives on it, as a
    server closing an idle keep-alive connection does at that instant."""
    import socket
    import struct

    answered = Counter[str]()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in range(2):
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if n == 1:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # RST, the request unread by any handler
                return
            answered["ok"] += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await gateway_factory(spec(f"127.0.0.1:{port}"))
        for _ in range(4):
            body = b"{}"
            async with gw.request(
                "POST", "scorer.fraud.localhost", "/v1/predict", data=body
            ) as resp:
                assert resp.status == 200, await resp.text()
        assert answered["ok"] == 4
        up = gw.worker.proxy.table.versions[0].upstreams[0]
        assert up.failures == 0 and not up.ejected
        assert gw.worker.registry.stats.retries == 3  # every reuse hit a reset, retried fresh
    finally:
        server.close()


async def test_client_faults_do_not_eject_replicas(gateway_factory: Any, replicas: Any) -> None:
    from gateway.proxy import ProxyLimits

    (echo,) = [await Replica("echo").start()]
    replicas.append(echo)
    config = GatewayConfig(proxy=ProxyLimits(max_body_bytes=100_000, buffer_body_bytes=1024),
                           pool=PoolLimits(eject_after=2))  # fmt: skip

    async def chunks() -> Any:
        for _ in range(50):
            yield b"z" * 10_000

    gw = await gateway_factory(spec(echo.address), config)
    for _ in range(4):
        async with gw.request("POST", "scorer.fraud.localhost", "/count", data=chunks()) as resp:
            assert resp.status == 413
    up = gw.worker.proxy.table.versions[0].upstreams[0]
    assert up.failures == 0 and not up.ejected
    assert gw.worker.registry.stats.errors == {}


async def test_stalled_upload_is_the_clients_fault(gateway_factory: Any, replicas: Any) -> None:
    (rep,) = [await Replica("count").start()]
    replicas.append(rep)
    gw = await gateway_factory(spec(rep.address, timeout_seconds=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /count HTTP/1.1\r\nHost: " + HOST
                 + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")  # fmt: skip
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)  # then it stalls
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    up = gw.worker.proxy.table.versions[0].upstreams[0]
    assert up.failures == 0 and gw.worker.registry.stats.errors == {}


async def test_pipelining_client_that_never_reads_is_held_back(
    gateway_factory: Any, replicas: Any
) -> None:
    (rep,) = [await Replica("big").start()]
    replicas.append(rep)
    gw = await gateway_factory(spec(rep.address))
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    request = b"GET /big?bytes=60000&length=1 HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"
    writer.write(request * 1000)  # 60 MB of answers asked for, none read
    await asyncio.sleep(2.0)
    buffered = 0
    for conn in list(gw.worker.proxy.table.versions[0].upstreams[0].idle):
        del conn
    import gc

    from aiohttp.web_protocol import RequestHandler

    for obj in gc.get_objects():
        if isinstance(obj, RequestHandler) and obj.transport is not None:
            buffered = max(buffered, obj.transport.get_write_buffer_size())
    writer.close()
    assert buffered < 4 * 1024 * 1024, buffered


async def test_response_headers_named_in_connection_are_dropped(gateway_factory: Any) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: hop\r\n"
                     b"X-App: kept\r\nContent-Length: 2\r\n\r\nok")  # fmt: skip
        await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await gateway_factory(spec(f"127.0.0.1:{port}"))
        async with gw.request("GET", "scorer.fraud.localhost", "/x") as resp:
            assert resp.headers["X-App"] == "kept"
            assert "X-Secret" not in resp.headers
    finally:
        server.close()


async def test_abandoned_requests_release_their_replica(
    gateway_factory: Any, replicas: Any
) -> None:
    (rep,) = [await Replica("sleepy").start()]
    replicas.append(rep)
    gw = await gateway_factory(spec(rep.address))
    writers = []
    for _ in range(5):
        _, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(b"GET /sleep?s=5 HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
        writers.append(w)
    await asyncio.sleep(0.3)
    up = gw.worker.proxy.table.versions[0].upstreams[0]
    assert up.outstanding == 5
    for w in writers:
        w.close()
    for _ in range(50):
        if up.outstanding == 0:
            break
        await asyncio.sleep(0.02)
    assert up.outstanding == 0 and not gw.worker.registry.busy
    snap = gw.worker.metrics.snapshot()
    codes = {s["code"]: s["count"] for v in snap["versions"] for s in v["series"]}
    assert codes == {499: 5}


def test_ejection_backoff_resets_after_recovery() -> None:
    from gateway.upstream import Upstream, UpstreamStats

    loop = asyncio.new_event_loop()
    try:
        up = Upstream("127.0.0.1", 1, loop, PoolLimits(eject_after=2), UpstreamStats(), set())
        for _incident in range(3):
            up.record_failure()
            up.record_failure()
            assert up.ejected and up.ejections == 1  # the first ejection each time
            up._readmit()
            up.record_success()
            assert up.ejections == 0
    finally:
        loop.close()
