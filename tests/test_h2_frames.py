"""The gateway's HTTP/2 layer on the wire: handshake, limits, abusive input, flow control.

Raw frames over a real socket to a gateway worker's gRPC port (the ``hpack`` package
encodes our request headers), plus unit tests of the header codec and frame builders.
Abuse is answered with GOAWAY, never with a crash: each abusive test ends by checking
the gateway still serves a fresh connection.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator
from typing import Any, Self

import grpc
import hpack
import pytest

from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.grpc.request import format_timeout, parse_timeout
from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.codec import HeaderDecoder, encode
from merlin_dp.gateway.h2.limits import H2Limits
from tests.conftest import Gateway, model_endpoint, version

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload
AUTHORITY = b"scorer.fraud.localhost"


# --- a replica that never answers, and one that echoes ---------------------------------------


class RawServer:
    """A raw TCP server on 127.0.0.1 standing in for a replica: subclasses answer each
    connection in ``handle``."""

    server: asyncio.Server | None = None
    port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class Hang(RawServer):
    """A TCP listener that reads everything and never answers: calls to it stay open."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self.received += data
        writer.close()

    def frames(self) -> list[Frame]:
        data = bytes(self.received)
        if not data:
            return []
        assert data.startswith(f.PREFACE)
        return parse_frames(data[len(f.PREFACE) :])


@pytest.fixture
async def hang() -> AsyncIterator[Hang]:
    h = await Hang().start()
    yield h
    await h.stop()


async def _echo(body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return body


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "caraml.upi.v1.UniversalPredictionService",
        {"PredictValues": grpc.unary_unary_rpc_method_handler(_echo)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


def routes(address: str) -> dict[str, Any]:
    me = model_endpoint("fraud", "scorer", {"1": 100})
    return {
        "revision": 1,
        "version_endpoints": [version("fraud", "scorer", "1", [address], protocol="UPI_V1")],
        "model_endpoints": [{**me, "protocol": "UPI_V1"}],
    }


async def gateway_to(factory: Any, address: str) -> Gateway:
    gw: Gateway = await factory(routes(address), GatewayConfig(grpc_port=0))
    return gw


# --- a raw client -------------------------------------------------------------------------


def parse_frames(data: bytes) -> list[Frame]:
    out = []
    pos = 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos < 9 + length:
            break
        ftype, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & f.MAX_STREAM_ID
        out.append((ftype, flags, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, gw: Gateway, settings: dict[int, int] | None = None) -> Client:
        assert gw.worker is not None and gw.worker.grpc_port
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.grpc_port)
        client = cls(reader, writer)
        writer.write(f.PREFACE + f.settings_frame(settings or {}))
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def headers(
        self, sid: int, authority: bytes = AUTHORITY, end: bool = False, **extra: str
    ) -> None:
        fields = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/caraml.upi.v1.UniversalPredictionService/PredictValues"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *((k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()),
        ]
        block = self.encoder.encode(fields)
        self.send(f.headers_frames(sid, block, end, f.DEFAULT_MAX_FRAME))

    def message(self, sid: int, body: bytes, end: bool = True) -> None:
        payload = b"\x00" + struct.pack(">I", len(body)) + body
        for i in range(0, len(payload), f.DEFAULT_MAX_FRAME):
            chunk = payload[i : i + f.DEFAULT_MAX_FRAME]
            last = end and i + f.DEFAULT_MAX_FRAME >= len(payload)
            self.send(f.frame(f.DATA, f.END_STREAM if last else 0, sid, chunk))

    async def frame(self) -> Frame:
        head = await self.reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        payload = await self.reader.readexactly(length)
        sid = int.from_bytes(head[5:9], "big") & f.MAX_STREAM_ID
        return head[3], head[4], sid, payload

    async def until(self, ftype: int, sid: int | None = None) -> list[Frame]:
        """Frames up to and including the first of ``ftype`` (on ``sid``)."""
        seen = []
        async with asyncio.timeout(20):  # a hang fails the test instead of stalling it
            while True:
                fr = await self.frame()
                seen.append(fr)
                if fr[0] == ftype and (sid is None or fr[2] == sid):
                    return seen

    async def goaway(self) -> tuple[int, int, bytes]:
        """The GOAWAY the gateway sent, then the connection closes."""
        frames = await self.until(f.GOAWAY)
        payload = frames[-1][3]
        last, code = f.parse_goaway(payload)
        async with asyncio.timeout(20):
            assert await self.reader.read() == b""  # closed after it
        return last, code, payload[8:]

    def decode(self, payload: bytes) -> dict[bytes, bytes]:
        return {bytes(n): bytes(v) for n, v in self.decoder.decode(payload, raw=True)}

    async def close(self) -> None:
        self.writer.close()


async def still_serving(gw: Gateway) -> None:
    client = await Client.connect(gw)
    client.send(f.frame(f.PING, 0, 0, b"alive!!!"))
    frames = await client.until(f.PING)
    assert frames[-1][1] & f.ACK and frames[-1][3] == b"alive!!!"
    await client.close()


# --- handshake ------------------------------------------------------------------------------


async def test_settings_and_ping_are_acknowledged(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.send(f.frame(f.PING, 0, 0, b"12345678"))
    frames = await client.until(f.PING)
    settings = [fr for fr in frames if fr[0] == f.SETTINGS]
    ours = dict(f.parse_settings(next(fr[3] for fr in settings if not fr[1] & f.ACK)))
    assert ours[f.SETTINGS_MAX_CONCURRENT_STREAMS] == H2Limits().max_concurrent_streams
    assert ours[f.SETTINGS_MAX_HEADER_LIST_SIZE] == 16 * 1024
    assert any(fr[1] & f.ACK for fr in settings)  # our SETTINGS acknowledged
    assert frames[-1] == (f.PING, f.ACK, 0, b"12345678")
    await client.close()


async def test_not_an_h2_preface_gets_goaway(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    assert gw.worker is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.grpc_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: scorer.fraud.localhost\r\n\r\n")
    client = Client(reader, writer)
    _, code, _ = await client.goaway()
    assert code == f.PROTOCOL_ERROR
    await still_serving(gw)


async def test_an_oversized_frame_gets_goaway(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.send(f.frame_head(f.DEFAULT_MAX_FRAME + 1, f.DATA, 0, 1) + b"\0" * 100)
    _, code, _ = await client.goaway()
    assert code == f.FRAME_SIZE_ERROR
    await still_serving(gw)


async def test_a_continuation_flood_gets_goaway(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    block = client.encoder.encode([(b":method", b"POST"), (b":path", b"/x")])
    client.send(f.frame(f.HEADERS, 0, 1, block))
    for _ in range(1000):
        client.send(f.frame(f.CONTINUATION, 0, 1, b""))
    _, code, _ = await client.goaway()
    assert code == f.ENHANCE_YOUR_CALM
    await still_serving(gw)


async def test_a_header_list_over_the_limit_gets_goaway(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.headers(1, x_big="v" * 20_000)  # 20 kB decoded, over the 16 KiB we announced
    _, code, _ = await client.goaway()
    assert code == f.ENHANCE_YOUR_CALM
    await still_serving(gw)


async def test_rapid_reset_gets_goaway(gateway_factory: Any, hang: Hang) -> None:
    """CVE-2023-44487: open and cancel streams as fast as possible."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    for i in range(2000):
        sid = 2 * i + 1
        client.headers(sid)
        client.send(f.rst_stream(sid, f.CANCEL))
    _, code, debug = await client.goaway()
    assert code == f.ENHANCE_YOUR_CALM
    assert b"reset" in debug
    await still_serving(gw)
    # Every call the flood opened has ended.
    assert gw.worker is not None
    assert all(v["in_flight"] == 0 for v in gw.worker.metrics.snapshot()["versions"])


async def test_garbage_frames_never_crash_the_gateway(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    rng = random.Random(44487)
    for _ in range(40):
        client = await Client.connect(gw)
        for _ in range(rng.randrange(1, 20)):
            ftype = rng.randrange(0, 12)
            flags = rng.randrange(0, 256)
            sid = rng.choice([0, 1, 2, 3, rng.randrange(0, 2**31)])
            payload = rng.randbytes(rng.choice([0, 1, 4, 5, 8, 9, 100]))
            client.send(f.frame(ftype, flags, sid, payload))
        client.send(f.frame(f.PING, 0, 0, b"ping!!!!"))
        # Either the gateway is still talking (PING answered) or it said why it hung up.
        async with asyncio.timeout(20):
            while True:
                try:
                    fr = await client.frame()
                except asyncio.IncompleteReadError:
                    break
                if fr[0] == f.GOAWAY or (fr[0] == f.PING and fr[1] & f.ACK):
                    break
        await client.close()
    await still_serving(gw)


# --- calls on raw frames ---------------------------------------------------------------------


class Refuser(RawServer):
    """A replica that speaks just enough HTTP/2 to refuse every call: with RST_STREAM
    REFUSED_STREAM, or with GOAWAY whose last-stream-id is below the call's."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.refused = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(f.PREFACE))
        writer.write(f.settings_frame({}))
        try:
            while True:
                head = await reader.readexactly(9)
                await reader.readexactly(int.from_bytes(head[:3], "big"))
                sid = int.from_bytes(head[5:9], "big")
                if head[3] == f.SETTINGS and not head[4] & f.ACK:
                    writer.write(f.SETTINGS_ACK)
                elif head[3] == f.HEADERS:
                    self.refused += 1
                    if self.how == "goaway":
                        writer.write(f.goaway(0, f.NO_ERROR))
                    else:
                        writer.write(f.rst_stream(sid, f.REFUSED_STREAM))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.mark.parametrize("how", ["rst", "goaway"])
async def test_a_refused_call_is_retried_on_another_replica(
    gateway_factory: Any, echo: str, how: str
) -> None:
    refuser = await Refuser(how).start()
    try:
        spec = routes(echo)
        spec["version_endpoints"][0]["replicas"].insert(0, f"127.0.0.1:{refuser.port}")
        gw: Gateway = await gateway_factory(spec, GatewayConfig(grpc_port=0))
        assert gw.worker is not None
        options = [("grpc.default_authority", AUTHORITY.decode())]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{gw.worker.grpc_port}", options=options
        ) as ch:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/caraml.upi.v1.UniversalPredictionService/PredictValues"
            )
            for i in range(30):
                assert await call(b"call %d" % i, timeout=10) == b"call %d" % i
        assert refuser.refused >= 1
        assert gw.worker.metrics.snapshot()["upstream"]["retries"] >= refuser.refused
    finally:
        await refuser.stop()


async def test_unknown_authority_is_trailers_only_not_found(
    gateway_factory: Any, hang: Hang
) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.headers(1, authority=b"nobody.fraud.localhost:8080")
    client.message(1, b"")
    frames = await client.until(f.HEADERS, sid=1)
    _, flags, _, payload = frames[-1]
    assert flags & f.END_STREAM  # Trailers-Only: one HEADERS frame ends the stream
    fields = client.decode(payload)
    assert fields[b":status"] == b"200" and fields[b"grpc-status"] == b"5"
    assert b"nobody.fraud.localhost" in fields[b"grpc-message"]
    await client.close()


async def test_the_gateway_enforces_grpc_timeout(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.headers(1, grpc_timeout="200m")
    client.message(1, b"\x0a\x00")
    frames = await client.until(f.HEADERS, sid=1)
    fields = client.decode(frames[-1][3])
    assert frames[-1][1] & f.END_STREAM
    assert fields[b"grpc-status"] == b"4"
    assert fields[b"x-model-version"] == b"1"
    # The replica got the deadline with the call, and a CANCEL when it passed.
    for _ in range(200):
        upstream = hang.frames()
        if any(fr[0] == f.RST_STREAM for fr in upstream):
            break
        await asyncio.sleep(0.01)
    [head] = [fr for fr in upstream if fr[0] == f.HEADERS]
    sent = {bytes(n): bytes(v) for n, v in hpack.Decoder().decode(head[3], raw=True)}
    assert sent[b"grpc-timeout"] == b"200m"
    assert sent[b":authority"] == AUTHORITY  # passed unchanged, as Host is on HTTP
    assert sent[b":path"] == b"/caraml.upi.v1.UniversalPredictionService/PredictValues"
    [rst] = [fr for fr in upstream if fr[0] == f.RST_STREAM]
    assert rst[2] == head[2] and f.u32(rst[3]) == f.CANCEL
    await client.close()


async def test_responses_respect_the_clients_window(gateway_factory: Any, echo: str) -> None:
    """A client granting 1000 bytes gets 1000 bytes, and the rest only as it grants more;
    no DATA frame is larger than its max frame size."""
    gw = await gateway_to(gateway_factory, echo)
    client = await Client.connect(gw, {f.SETTINGS_INITIAL_WINDOW_SIZE: 1000})
    body = bytes(range(256)) * 400  # 102400 bytes, over the 65535 connection window
    client.headers(1)
    client.message(1, body)
    got = 0
    frames = await client.until(f.HEADERS, sid=1)  # response headers
    async with asyncio.timeout(20):
        while got < 1000:
            fr = await client.frame()
            if fr[0] == f.DATA:
                got += len(fr[3])
    assert got == 1000
    # Nothing more comes until we grant it (a PING round trip shows the pipe is idle).
    client.send(f.frame(f.PING, 0, 0, b"barrier!"))
    frames = await client.until(f.PING)
    assert not [fr for fr in frames if fr[0] == f.DATA]
    client.send(f.window_update(0, 10_000_000) + f.window_update(1, 10_000_000))
    data = b""
    async with asyncio.timeout(20):
        while True:
            fr = await client.frame()
            if fr[0] == f.DATA:
                assert len(fr[3]) <= f.DEFAULT_MAX_FRAME
                data += fr[3]
            if fr[0] == f.HEADERS and fr[1] & f.END_STREAM:
                assert client.decode(fr[3])[b"grpc-status"] == b"0"
                break
    assert got + len(data) == 5 + len(body)
    await client.close()


async def test_shutdown_sends_goaway(gateway_factory: Any, tmp_path: Any, hang: Hang) -> None:
    gw = await Gateway(tmp_path, GatewayConfig(grpc_port=0, shutdown_seconds=0.5)).start(
        routes(f"127.0.0.1:{hang.port}")
    )
    client = await Client.connect(gw)
    client.headers(1)
    client.message(1, b"")
    await client.until(f.SETTINGS)
    stopping = asyncio.ensure_future(gw.stop())
    last, code, _ = await client.goaway()
    assert code == f.NO_ERROR and last == 1
    await stopping
    gw.worker = None
    gw.session = None


# --- codec and frame builders ------------------------------------------------------------------


def test_a_repeated_block_is_decoded_once_while_the_table_is_unchanged() -> None:
    enc = hpack.Encoder()
    fields = [(b":method", b"POST"), (b"x-user", b"ana")]
    first = enc.encode(fields)  # indexes x-user: changes the decoder's table
    second = enc.encode(fields)  # references only
    dec = HeaderDecoder(16 * 1024)
    a = dec.decode(first)
    b = dec.decode(second)
    assert a.headers == b.headers == fields
    assert dec.decode(second) is b  # cached
    # A block that changes the table is never served from the cache.
    assert dec.decode(first) is not a
    # After the table changed, a cached block is decoded afresh.
    enc2 = hpack.Encoder()
    dec2 = HeaderDecoder(16 * 1024)
    dec2.decode(enc2.encode(fields))
    ref = enc2.encode(fields)
    cached = dec2.decode(ref)
    dec2.decode(enc2.encode([(b"x-other", b"1")]))
    assert dec2.decode(ref) is not cached


def test_literal_encoding_round_trips_through_a_real_decoder() -> None:
    fields = [(b":status", b"200"), (b"x-long", b"v" * 300), (b"x-bin-bin", b"\x00\xff")]
    assert [(bytes(n), bytes(v)) for n, v in hpack.Decoder().decode(encode(fields), raw=True)] == (
        fields
    )


def test_an_oversized_header_list_is_refused() -> None:
    block = hpack.Encoder().encode([(b"x-big", b"v" * 20_000)])
    with pytest.raises(Exception, match="header list"):
        HeaderDecoder(16 * 1024).decode(block)


def test_grpc_timeouts() -> None:
    assert parse_timeout(b"200m") == pytest.approx(0.2)
    assert parse_timeout(b"1H") == 3600
    assert parse_timeout(b"5n") == pytest.approx(5e-9)
    for bad in (b"", b"m", b"123456789S", b"1x", b"-1S"):
        assert parse_timeout(bad) is None
    for seconds in (0.0001, 0.25, 3.0, 500.0, 10**7):
        text = format_timeout(seconds)
        parsed = parse_timeout(text)
        assert parsed is not None and len(text) <= 9
        assert parsed == pytest.approx(min(seconds, 99_999.999), rel=1e-3)


def test_a_big_header_block_is_split_into_continuations() -> None:
    block = b"x" * 40_000
    frames = parse_frames(f.headers_frames(3, block, True, f.DEFAULT_MAX_FRAME))
    assert [fr[0] for fr in frames] == [f.HEADERS, f.CONTINUATION, f.CONTINUATION]
    assert frames[0][1] == f.END_STREAM and frames[-1][1] == f.END_HEADERS
    assert b"".join(fr[3] for fr in frames) == block


# --- back-pressure, stream limits, timeouts ----------------------------------------------------


async def test_a_client_is_credited_only_for_what_the_replica_took(
    gateway_factory: Any, hang: Hang
) -> None:
    """The replica (which never reads, so never grants more than its initial 65535-byte
    windows) takes 65535 bytes; the client may fill the 1 MiB window the gateway granted
    it, and gets no credit back beyond what went on. One byte more is a flow-control error."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.headers(1)
    window = 1024 * 1024
    chunk = b"\0" * f.DEFAULT_MAX_FRAME
    for _ in range(window // len(chunk)):
        client.send(f.frame(f.DATA, 0, 1, chunk))
    client.send(f.frame(f.PING, 0, 0, b"barrier!"))
    frames = await client.until(f.PING)
    credited = sum(f.u32(fr[3]) for fr in frames if fr[0] == f.WINDOW_UPDATE and fr[2] == 1)
    assert credited <= f.DEFAULT_WINDOW
    for _ in range(200):
        upstream = hang.frames()
        if sum(len(fr[3]) for fr in upstream if fr[0] == f.DATA) >= f.DEFAULT_WINDOW:
            break
        await asyncio.sleep(0.01)
    assert sum(len(fr[3]) for fr in upstream if fr[0] == f.DATA) == f.DEFAULT_WINDOW
    client.send(f.frame(f.DATA, 0, 1, b"\0" * (credited + 1)))
    frames = await client.until(f.RST_STREAM, sid=1)
    assert f.u32(frames[-1][3]) == f.FLOW_CONTROL_ERROR
    await client.close()
    await still_serving(gw)


async def test_streams_over_the_limit_are_refused(gateway_factory: Any, hang: Hang) -> None:
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    limit = H2Limits().max_concurrent_streams
    for i in range(limit + 1):
        client.headers(2 * i + 1)
    frames = await client.until(f.RST_STREAM)
    assert frames[-1][2] == 2 * limit + 1 and f.u32(frames[-1][3]) == f.REFUSED_STREAM
    await client.close()


async def test_silent_and_idle_connections_are_closed(tmp_path: Any) -> None:
    from merlin_dp.common.net import bind_socket
    from merlin_dp.gateway.grpc.proxy import GrpcProxy
    from merlin_dp.gateway.h2.server import H2Listener
    from merlin_dp.gateway.metrics import GatewayMetrics
    from merlin_dp.gateway.pool.upstream import PoolLimits, UpstreamStats

    proxy = GrpcProxy(GatewayMetrics(UpstreamStats()), PoolLimits())
    listener = H2Listener(proxy, H2Limits(idle_seconds=0.2, handshake_seconds=0.2))
    listener.TICK = 0.05
    sock = bind_socket("127.0.0.1", 0, reuse_port=False)
    port = sock.getsockname()[1]
    await listener.start(sock)
    try:
        # No preface at all (a slowloris): GOAWAY, closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        _, code, _ = await Client(reader, writer).goaway()
        assert code == f.PROTOCOL_ERROR
        writer.close()
        # A proper connection with no call: closed politely once idle.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f.PREFACE + f.settings_frame({}))
        _, code, _ = await Client(reader, writer).goaway()
        assert code == f.NO_ERROR
        writer.close()
    finally:
        await listener.stop(1.0)
        await proxy.close()


async def test_bodies_of_failed_calls_are_credited_back(gateway_factory: Any) -> None:
    """A call held while its replica is dialled and then answered UNAVAILABLE never
    forwarded its body: the gateway still gives those bytes back to the connection's
    window, or 16 MiB of failed calls would stall the client for good."""
    from merlin_dp.common.net import free_port

    gw = await gateway_to(gateway_factory, f"127.0.0.1:{free_port()}")  # refuses connects
    client = await Client.connect(gw)
    body = b"\0" * (1024 * 1024 - 64)
    for i in range(24):  # 24 MiB through a 16 MiB connection window
        sid = 2 * i + 1
        client.headers(sid)
        client.message(sid, body)
        frames = await client.until(f.HEADERS, sid=sid)
        assert not [fr for fr in frames if fr[0] == f.GOAWAY]
        assert client.decode(frames[-1][3])[b"grpc-status"] == b"14"
    await client.close()
