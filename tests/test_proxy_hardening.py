"""Regressions for framing, pooling and blame bugs found in review: each case failed
before its fix."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.pool.upstream import PoolLimits
from tests.conftest import Procs, Replica, model_endpoint, version, write_routes
from tests.test_bad_inputs import raw_exchange
from tests.test_bytes import read_chunked

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
        from merlin_dp.gateway.http.proxy import ProxyLimits

        config = GatewayConfig(proxy=ProxyLimits(buffer_body_bytes=1024))
        gw = await gateway_factory(spec(f"127.0.0.1:{port}"), config)

        async def slow_upload() -> AsyncIterator[bytes]:
            # Over the buffer, so streamed, and slow enough that the answer surely comes
            # while it still streams: sent at once, the whole body could leave the
            # gateway before it reads the answer, and nothing would tell it apart from a
            # replica that read it all.
            for _ in range(10):
                yield b"u" * 20_000
                await asyncio.sleep(0.02)

        async with gw.request(
            "POST", "scorer.fraud.localhost", "/upload", data=slow_upload(),
            headers={"Content-Length": "200000"},
        ) as resp:  # fmt: skip
            assert await resp.read() == b"early"
        for _ in range(3):
            async with gw.request("GET", "scorer.fraud.localhost", "/next") as resp:
                assert resp.status == 200 and await resp.read() == b"early"
        assert requests_seen[1:] == [b"GET /next HTTP/1.1"] * 3
        up = gw.worker.proxy.table.versions[0].upstreams[0]
        assert up.outstanding == 0 and not gw.worker.http1.busy
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
    from merlin_dp.gateway.http.proxy import ProxyLimits

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
    up = gw.worker.proxy.table.versions[0].upstreams[0]
    for conn in list(gw.worker.http1.idle.get(up, [])):
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
    assert up.outstanding == 0 and not gw.worker.http1.busy
    snap = gw.worker.metrics.snapshot()
    codes = {s["code"]: s["count"] for v in snap["versions"] for s in v["series"]}
    assert codes == {499: 5}


def test_ejection_backoff_resets_after_recovery() -> None:
    from merlin_dp.gateway.pool.upstream import Upstream, UpstreamStats

    loop = asyncio.new_event_loop()
    try:
        up = Upstream("127.0.0.1", 1, loop, PoolLimits(eject_after=2), UpstreamStats())
        for _incident in range(3):
            up.record_failure()
            up.record_failure()
            assert up.ejected and up.ejections == 1  # the first ejection each time
            up._readmit()
            up.record_success()
            assert up.ejections == 0
    finally:
        loop.close()


# --- hostile replicas ---------------------------------------------------------------

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


class RawReplica:
    """A replica speaking HTTP/1.1 by hand: it reads each request (head and body, by
    Content-Length or chunked) and lets ``answer`` write whatever it likes."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []  # request lines, in arrival order
        self.heads: list[bytes] = []  # whole heads, likewise
        self.connections = 0
        self.sent = 0  # bytes an answer managed to write (see stream_head)
        self.server: asyncio.Server | None = None

    async def start(self) -> RawReplica:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                    elif line == b"transfer-encoding: chunked":
                        await read_chunked(reader)
                self.requests.append(head.split(b"\r\n", 1)[0])
                self.heads.append(head)
                await self.answer(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def answering(data: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return answer


# Each is one write: the extra bytes arrive in the same read as the whole answer.
OVERRUNS = {
    "bytes past Content-Length": (200, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"),
    "a body on a 204": (204, b"HTTP/1.1 204 No Content\r\n\r\nbody"),
    "a body on a 304": (304, b"HTTP/1.1 304 Not Modified\r\n\r\nbody"),
    "half a second answer": (
        200,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
    ),
}


@pytest.mark.parametrize("status, answer", OVERRUNS.values(), ids=list(OVERRUNS))
async def test_bytes_after_a_whole_answer_retire_the_connection(
    gateway_factory: Any, status: int, answer: bytes
) -> None:
    """The extra bytes left the parser failed (or mid-message) and the connection went
    back to the pool: the next POST reached the replica, was processed, and its client
    got a 502 — an invitation to send it twice."""
    replica = await RawReplica(answering(answer)).start()
    try:
        gw = await gateway_factory(spec(replica.address))
        for i in range(5):
            async with gw.request("POST", HOST.decode(), f"/p{i}", data=b"{}") as resp:
                assert resp.status == status, await resp.text()
        assert replica.requests == [b"POST /p%d HTTP/1.1" % i for i in range(5)]
        assert replica.connections == 5  # no request went down a spoiled connection
        assert gw.worker.registry.stats.errors == {}  # the answers were good
    finally:
        replica.close()


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 999 Weird", b"HTTP/1.1 600 Nope", b"HTTP/1.1 099 Early", b"HTTP/1.1 000 Zero",
     b"HTTP/1.1 2000 OK", b"HTTP/1.1 20 OK"],
)  # fmt: skip
async def test_a_status_outside_100_to_599_is_a_502(
    gateway_factory: Any, status_line: bytes
) -> None:
    """999 was relayed as is; 099 was taken for an interim answer and waited on until
    the route's timeout."""
    replica = await RawReplica(answering(status_line + b"\r\nContent-Length: 2\r\n\r\nok")).start()
    try:
        gw = await gateway_factory(spec(replica.address, timeout_seconds=5))
        async with gw.request("GET", HOST.decode(), "/x") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "bad_gateway"
    finally:
        replica.close()


def stream_head(replica_sent: list[int], total: int) -> Answer:
    """A head that never ends: one header value, ``total`` bytes long, sent in 64 KiB
    writes until the gateway stops reading."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        block = b"a" * 65536
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
            replica_sent[0] += len(block)
        writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    return answer


def _head(*headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(headers) + b"Content-Length: 2\r\n\r\nok"


HEADS = {
    "a 1 MB header": answering(_head(b"X-Big: " + b"a" * 1024 * 1024 + b"\r\n")),
    "10,000 small headers": answering(_head(*(b"X-H-%d: v\r\n" % i for i in range(10_000)))),
    "101 headers": answering(_head(*(b"X-H-%d: v\r\n" % i for i in range(101)))),
    "endless 103 Early Hints": answering(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 5000),
}


@pytest.mark.parametrize("answer", HEADS.values(), ids=list(HEADS))
async def test_an_oversized_response_head_is_a_502(gateway_factory: Any, answer: Answer) -> None:
    """Response heads had no limit: each of these was relayed (or read to the end)."""
    replica = await RawReplica(answer).start()
    try:
        gw = await gateway_factory(spec(replica.address))
        async with gw.request("GET", HOST.decode(), "/x") as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "bad_gateway"
        assert gw.worker.registry.stats.errors == {"protocol": 1}
    finally:
        replica.close()


async def test_an_endless_response_head_is_cut_at_the_limit(gateway_factory: Any) -> None:
    sent = [0]
    replica = await RawReplica(stream_head(sent, 1 << 40)).start()
    try:
        gw = await gateway_factory(spec(replica.address))
        async with asyncio.timeout(60):  # before the fix: read until memory ran out
            async with gw.request("GET", HOST.decode(), "/x") as resp:
                assert resp.status == 502
        # The gateway stopped reading: the replica got no further than socket buffers.
        assert sent[0] < 32 * 1024 * 1024
    finally:
        replica.close()


async def test_response_heads_within_the_limits_pass_whole(gateway_factory: Any) -> None:
    """At both limits exactly, with the body in the same read as the head."""
    config = GatewayConfig(pool=PoolLimits(max_head_bytes=64 * 1024, max_headers=100))
    body = b"b" * 200_000
    fixed = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    # 99 headers of about 660 bytes, then a 100th that makes the head 64 KiB exactly.
    headers = [b"X-H-%02d: %s\r\n" % (i, b"v" * 650) for i in range(98)]
    pad = 64 * 1024 - len(fixed) - sum(map(len, headers)) - len(b"X-Pad: \r\n\r\n")
    head = fixed + b"".join(headers) + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"
    assert len(head) == 64 * 1024 and head.count(b"\r\n") - 2 == 100
    replica = await RawReplica(answering(head + body)).start()
    try:
        gw = await gateway_factory(spec(replica.address), config)
        for _ in range(2):
            async with gw.request("GET", HOST.decode(), "/x") as resp:
                assert resp.status == 200
                assert resp.headers["X-Pad"] == "p" * pad and await resp.read() == body
        assert replica.connections == 1
    finally:
        replica.close()


async def test_an_endless_response_head_leaves_gateway_memory_bounded(
    tmp_path: Path, procs: Procs
) -> None:
    """A 200 MB header took a gateway process from 121 MB to 632 MB of RSS."""
    sent = [0]
    replica = await RawReplica(stream_head(sent, 200 * 1024 * 1024)).start()
    try:
        routes = tmp_path / "routes.json"
        write_routes(routes, spec(replica.address))
        gw, admin = procs.gateway(routes)
        ready = b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        for _ in range(100):
            if (await raw_exchange(admin, ready))[0] == 200:
                break
            await asyncio.sleep(0.05)
        before = gw.rss_bytes()
        request = b"GET /x HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
        for _ in range(3):
            status, _, body = await raw_exchange(gw.port, request)
            assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"
        assert gw.peak_rss_bytes() - before < 60 * 1024 * 1024
        assert sent[0] < 3 * 32 * 1024 * 1024
    finally:
        replica.close()


# --- hostile clients ----------------------------------------------------------------
# What reaches a replica is what the gateway routed: each probe below sends raw bytes
# from 127.0.0.1 and checks the request line and head a raw replica received, if any.

OK = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def until_closed(port: int, data: bytes, then: bytes = b"") -> bytes:
    """Everything the gateway answers to ``data`` (and ``then``, written a moment later),
    up to its close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if then:
            await asyncio.sleep(0.2)  # the gateway has read ``data`` by itself
            writer.write(then)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def statuses(answers: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)]


@pytest.fixture
async def raw_replica() -> Any:
    replica = await RawReplica(OK).start()
    yield replica
    replica.close()


async def test_an_absolute_form_target_is_routed_by_its_authority(
    gateway_factory: Any, raw_replica: RawReplica
) -> None:
    """It was routed by Host and passed on as it came: a replica got
    ``GET http://other.example/v1/predict`` for a target that named another host."""
    gw = await gateway_factory(spec(raw_replica.address))
    named = (b"GET http://scorer.fraud.localhost:8080/v1/predict?x=1 HTTP/1.1\r\n"
             b"Host: other.example\r\nConnection: close\r\n\r\n")  # fmt: skip
    status, _, _ = await raw_exchange(gw.port, named)
    assert status == 200
    assert raw_replica.requests == [b"GET /v1/models/scorer-1:predict?x=1 HTTP/1.1"]
    hosts = [
        line for line in raw_replica.heads[0].split(b"\r\n") if line.lower().startswith(b"host:")
    ]
    assert hosts == [b"Host: scorer.fraud.localhost:8080"]
    elsewhere = (b"GET http://other.example/v1/predict HTTP/1.1\r\nHost: " + HOST
                 + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
    status, _, body = await raw_exchange(gw.port, elsewhere)
    assert status == 404 and b"other.example" in body
    for target in [
        b"http://u@scorer.fraud.localhost/v1/predict",
        b"ftp://scorer.fraud.localhost/x",
    ]:
        request = (
            b"GET " + target + b" HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
        )
        assert (await raw_exchange(gw.port, request))[0] == 400
    assert len(raw_replica.requests) == 1


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"identity, chunked"])
async def test_a_transfer_coding_other_than_chunked_gets_501(
    gateway_factory: Any, raw_replica: RawReplica, coding: bytes
) -> None:
    """The gzip coding was dropped on the way: the replica got the body de-chunked but
    still gzip-coded, under a ``Transfer-Encoding: chunked`` that no longer said so."""
    gw = await gateway_factory(spec(raw_replica.address))
    request = (b"POST /v1/predict HTTP/1.1\r\nHost: " + HOST + b"\r\nTransfer-Encoding: " + coding
               + b"\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")  # fmt: skip
    status, headers, body = await raw_exchange(gw.port, request)
    assert status == 501, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "not_implemented"
    assert raw_replica.requests == []


async def test_transfer_encoding_is_refused_on_http_1_0_and_plain_chunked_passes(
    gateway_factory: Any, raw_replica: RawReplica
) -> None:
    gw = await gateway_factory(spec(raw_replica.address))
    old = (b"POST /v1/predict HTTP/1.0\r\nHost: " + HOST
           + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")  # fmt: skip
    status, _, body = await raw_exchange(gw.port, old)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    assert raw_replica.requests == []
    plain = (b"POST /x HTTP/1.1\r\nHost: " + HOST + b"\r\nTransfer-Encoding: Chunked"
             b"\r\nConnection: close\r\n\r\n0\r\n\r\n")  # fmt: skip
    assert (await raw_exchange(gw.port, plain))[0] == 200
    assert raw_replica.requests == [b"POST /x HTTP/1.1"]


@pytest.mark.parametrize(
    "request_line",
    [b"CONNECT scorer.fraud.localhost:443 HTTP/1.1", b"CONNECT /v1/predict HTTP/1.1",
     b"TRACE /v1/predict HTTP/1.1"],
)  # fmt: skip
async def test_connect_and_trace_are_answered_by_the_gateway(
    gateway_factory: Any, raw_replica: RawReplica, request_line: bytes
) -> None:
    """Both were passed to the replica; after the CONNECT, the gateway held the
    connection for the keep-alive timeout."""
    gw = await gateway_factory(spec(raw_replica.address))
    answer = await until_closed(
        gw.port, request_line + b"\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    )
    assert statuses(answer) == [405], answer
    assert b"\r\nAllow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n" in answer
    assert b'"code":"method_not_allowed"' in answer
    assert raw_replica.requests == []


async def test_options_asterisk_is_answered_by_the_gateway(
    gateway_factory: Any, raw_replica: RawReplica
) -> None:
    gw = await gateway_factory(spec(raw_replica.address))
    star = b"OPTIONS * HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    status, _, body = await raw_exchange(gw.port, star)
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    assert raw_replica.requests == []
    path = b"OPTIONS /x HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    assert (await raw_exchange(gw.port, path))[0] == 200
    assert raw_replica.requests == [b"OPTIONS /x HTTP/1.1"]


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"


async def test_an_upgrade_request_and_the_one_pipelined_behind_it_are_answered(
    gateway_factory: Any, raw_replica: RawReplica
) -> None:
    """The second was never answered: aiohttp's parser dropped the rest of the read after
    a request asking to Upgrade, and the connection sat for the keep-alive timeout."""
    gw = await gateway_factory(spec(raw_replica.address))
    first = b"GET /a HTTP/1.1\r\nHost: " + HOST + b"\r\n" + H2C + b"\r\n"
    second = b"GET /b HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    answers = await until_closed(gw.port, first + second)
    assert statuses(answers) == [200, 200], answers
    assert raw_replica.requests == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]
    assert b"h2c" not in raw_replica.heads[0] and b"HTTP2-Settings" not in raw_replica.heads[0]


async def test_an_upgrade_request_split_across_reads_is_answered_and_the_next_too(
    gateway_factory: Any, raw_replica: RawReplica
) -> None:
    """Begun in an earlier read: with aiohttp's parser the bytes after it were dropped and
    the connection had to close; the gateway's own parser reads on after it."""
    gw = await gateway_factory(spec(raw_replica.address))
    start = b"GET /a HTTP/1.1\r\nHost: " + HOST + b"\r\n"
    rest = H2C + b"\r\nGET /b HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    answers = await until_closed(gw.port, start, then=rest)
    assert statuses(answers) == [200, 200], answers
    assert raw_replica.requests == [b"GET /a HTTP/1.1", b"GET /b HTTP/1.1"]


async def test_many_pipelined_upgrade_requests_are_all_answered(
    gateway_factory: Any, raw_replica: RawReplica
) -> None:
    """Past aiohttp's queue of 32 pipelined requests its parser dropped what followed a
    request asking to Upgrade; every one is answered now, in order, and the connection
    stays open until the client says close."""
    gw = await gateway_factory(spec(raw_replica.address))
    upgrade = b"GET /u HTTP/1.1\r\nHost: " + HOST + b"\r\n" + H2C + b"\r\n"
    last = b"GET /end HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"
    answers = await until_closed(gw.port, upgrade * 200 + last)
    assert statuses(answers) == [200] * 201
    assert raw_replica.requests == [b"GET /u HTTP/1.1"] * 200 + [b"GET /end HTTP/1.1"]
    assert answers.count(b"\r\nConnection: close\r\n") == 1


@pytest.mark.parametrize(
    ("host", "target", "outcome"),
    [
        (HOST, b"/v1/./x/../predict", b"/v1/models/scorer-1:predict"),
        (HOST, b"/v1/x/%2E%2e/predict?next=/../y", b"/v1/models/scorer-1:predict?next=/../y"),
        (b"127.0.0.1", b"/serving/fraud/nope/../scorer/v1/predict", b"/v1/models/scorer-1:predict"),
        (b"127.0.0.1", b"/serving/fraud/nope/.%2e/scorer/x/", b"/x/"),
        (b"127.0.0.1", b"/serving/fraud/scorer/../../x", 404),  # /serving/x: nothing there
        (HOST, b"/v1/../../x", 400),  # above the root
    ],
)  # fmt: skip
async def test_dot_segments_are_resolved_before_routing(
    gateway_factory: Any,
    raw_replica: RawReplica,
    host: bytes,
    target: bytes,
    outcome: bytes | int,
) -> None:
    """What was routed was not what was forwarded: ``/serving/fraud/scorer/../../x`` went
    to scorer's replica as ``/../../x``, and ``/v1/../v1/predict`` skipped the rewrite.
    ``outcome``: the target the replica gets, or the gateway's status."""
    gw = await gateway_factory(spec(raw_replica.address))
    request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    status, _, body = await raw_exchange(gw.port, request)
    if isinstance(outcome, int):
        assert status == outcome, body
        assert raw_replica.requests == []
    else:
        assert status == 200, body
        assert raw_replica.requests == [b"GET " + outcome + b" HTTP/1.1"]


async def test_a_malformed_chunk_after_the_body_began_gets_400_and_a_close(
    gateway_factory: Any, replicas: Any
) -> None:
    """The head went on and the body began to stream when a bad chunk size came: the
    client gets 400 (it was answered 408 after a timeout before the front was ours), the
    connection closes, and the replica's exchange is dropped, not left half-sent."""
    (r1,) = [await Replica("v1").start()]
    replicas.append(r1)
    gw = await gateway_factory(spec(r1.address))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: " + HOST + b"\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")  # fmt: skip
        await asyncio.sleep(0.2)  # the body streams to the replica
        writer.write(b"zz\r\nbad\r\n0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # to the close
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert answer.count(b"HTTP/1.1 ") == 1
    assert not gw.worker.http1.busy
