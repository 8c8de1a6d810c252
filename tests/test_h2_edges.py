"""The gRPC front's edge cases (``merlin_dp/gateway/h2``), from a review of it: each test states the
rule it checks. Those whose docstring begins "Was a bug." failed on the code as
reviewed; the others cover a path no other test covers. Raw frames over real sockets on
127.0.0.1 to an in-process gateway worker (the helpers of ``tests/test_h2_frames.py``).
Nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loadtests.harness.tools import ensure_tools
from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.server import ServerConnection
from tests.conftest import Gateway
from tests.test_h2_frames import Client, Frame, Hang, RawServer, gateway_to, still_serving


@pytest.fixture
async def hang() -> AsyncIterator[Hang]:
    h = await Hang().start()
    yield h
    await h.stop()


def server_conn(gw: Gateway) -> ServerConnection:
    assert gw.worker is not None and gw.worker.grpc_listener is not None
    [conn] = gw.worker.grpc_listener.connections
    return conn


async def until_goaway_or_ping(client: Client) -> list[Frame]:
    """Frames up to a GOAWAY, the ACK of our PING, or the connection's end."""
    seen: list[Frame] = []
    async with asyncio.timeout(30):
        while True:
            try:
                fr = await client.frame()
            except asyncio.IncompleteReadError:
                return seen
            seen.append(fr)
            if fr[0] == f.GOAWAY or (fr[0] == f.PING and fr[1] & f.ACK):
                return seen


def call_done(gw: Gateway, sid: int) -> bool:
    """The gateway has ended the call on client stream ``sid`` (or the stream is gone)."""
    conn = server_conn(gw)
    if conn.last_peer_stream < sid:
        return False  # not read yet
    stream = conn.streams.get(sid)
    return stream is None or bool(getattr(stream.handler, "done", False))


def goaway_code(frames: list[Frame]) -> int | None:
    for fr in frames:
        if fr[0] == f.GOAWAY:
            return f.parse_goaway(fr[3])[1]
    return None


# --- 1. MadeYouReset (CVE-2025-8671) ---------------------------------------------------------


async def test_resets_the_client_provokes_count_against_the_rapid_reset_budget(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. A client that opens a call and then sends an invalid frame
    on it (here WINDOW_UPDATE with increment 0, RFC 9113 §6.9) makes the *gateway* reset
    the stream, and the gateway has already opened and then cancels a stream to the
    replica. Those resets are never charged to the rapid-reset bucket (only the client's
    own RST_STREAMs are, ``ServerConnection.peer_reset``), so the CVE-2023-44487
    mitigation is bypassed: 2000 calls opened and killed without a GOAWAY, each one a
    HEADERS + RST_STREAM to the replica."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    for i in range(2000):
        sid = 2 * i + 1
        client.headers(sid)
        client.send(f.window_update(sid, 0))  # stream error: the gateway resets it
    client.send(f.frame(f.PING, 0, 0, b"flooded!"))
    frames = await until_goaway_or_ping(client)
    resets = [fr for fr in frames if fr[0] == f.RST_STREAM]
    assert goaway_code(frames) == f.ENHANCE_YOUR_CALM, (
        f"{len(resets)} streams reset by the gateway on the client's prompting, no GOAWAY"
    )
    await client.close()
    await still_serving(gw)


# --- 2. unbounded output to a client that never reads ------------------------------------------


async def test_a_client_that_never_reads_cannot_grow_the_gateways_output_buffer(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. ``pause_writing`` only sets ``paused`` (DATA is queued behind
    flow control), but the gateway keeps reading and answering HEADERS while paused:
    header blocks, Trailers-Only answers and RST_STREAMs are written regardless. A
    client that sends ~15-byte requests (HPACK-indexed) to an unknown :authority and never
    reads gets ~150-byte answers buffered in the gateway's transport without bound
    (a 10x memory amplification). The gateway should stop reading from a connection
    whose transport is paused (``transport.pause_reading()``) until it drains."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    assert gw.worker is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.worker.grpc_port))
    reader, writer = await asyncio.open_connection(sock=sock)
    client = Client(reader, writer)
    client.send(f.PREFACE + f.settings_frame({}))

    async def flood() -> None:
        sid = 1
        while True:
            for _ in range(1000):
                client.headers(sid, authority=b"nobody.fraud.localhost", end=True)
                sid += 2
            await writer.drain()  # blocks for good once the gateway stops reading

    sender = asyncio.ensure_future(flood())
    conn = server_conn(gw)
    try:
        async with asyncio.timeout(60):
            while not conn.paused and not conn.closed:
                await asyncio.sleep(0.05)
        # It reads on only while the kernel's socket buffers still take its answers,
        # then stops: the flood goes on, the gateway no longer follows it.
        async with asyncio.timeout(60):
            while True:
                before = conn.last_peer_stream
                await asyncio.sleep(0.5)
                assert conn.transport is not None
                buffered = conn.transport.get_write_buffer_size()
                # The high-water mark is 64 KiB; a few frames past it is fine, megabytes
                # are not.
                assert buffered <= 1024 * 1024, f"{buffered} bytes buffered, never read"
                if conn.last_peer_stream == before and conn.paused:
                    break
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        # Abort: a close would wait to flush the flood the gateway no longer reads, and the
        # gateway's stop would wait out its grace period for this connection.
        writer.transport.abort()


# --- 3. HPACK: SETTINGS_HEADER_TABLE_SIZE lowered by the peer --------------------------------


async def test_a_lowered_header_table_size_is_acknowledged_in_the_next_block(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. RFC 7541 §4.2: when the decoder lowers the table size
    (SETTINGS_HEADER_TABLE_SIZE, RFC 9113 §6.5.2) the encoder MUST signal a dynamic
    table size update at the start of its next header block. The gateway ignores the
    setting and never sends one; nghttp2 (h2load, nghttp, curl, Envoy...) enforces the
    rule and fails the connection with COMPRESSION_ERROR (see the nghttp test below)."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw, {f.SETTINGS_HEADER_TABLE_SIZE: 0})
    await client.until(f.SETTINGS)  # theirs
    client.headers(1, authority=b"nobody.fraud.localhost", end=True)
    frames = await client.until(f.HEADERS, sid=1)
    block = frames[-1][3]
    assert block[0] & 0xE0 == 0x20, "no dynamic table size update (001xxxxx) opens the block"
    await client.close()


async def test_an_nghttp2_client_with_a_small_header_table_gets_its_answer(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. The same rule seen from a real client: ``nghttp -c 0``
    (decoder table size 0) gets the Trailers-Only NOT_FOUND, not a COMPRESSION_ERROR."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    assert gw.worker is not None
    url = f"http://127.0.0.1:{gw.worker.grpc_port}/caraml.upi.v1.UniversalPredictionService/x"
    args = ["-v", "-c", "0", "-H", ":method: POST", "-H", ":authority: nobody.fraud.localhost",
            "-H", "content-type: application/grpc", "-H", "te: trailers", url]  # fmt: skip
    nghttp = ensure_tools(["nghttp"])["nghttp"]  # installed when missing, never skipped
    proc = await asyncio.create_subprocess_exec(
        nghttp, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert "COMPRESSION_ERROR" not in text, text
    assert "grpc-status: 5" in text, text


# --- 4. SETTINGS_INITIAL_WINDOW_SIZE overflowing an open stream's window ------------------------


async def test_an_initial_window_change_overflowing_a_stream_window_is_an_error(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. RFC 9113 §6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE change that
    makes any flow-control window exceed 2^31-1 is a connection error FLOW_CONTROL_ERROR.
    ``_on_settings`` adds the delta to every stream without checking."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.headers(1)  # an open call: the replica never answers
    client.send(f.window_update(1, f.MAX_WINDOW - f.DEFAULT_WINDOW))  # exactly 2^31-1
    client.send(f.settings_frame({f.SETTINGS_INITIAL_WINDOW_SIZE: f.DEFAULT_WINDOW + 1}))
    client.send(f.frame(f.PING, 0, 0, b"overflow"))
    frames = await until_goaway_or_ping(client)
    assert goaway_code(frames) == f.FLOW_CONTROL_ERROR
    await client.close()


# --- 5. stream id rules --------------------------------------------------------------------------


async def test_a_stream_id_below_one_already_used_is_a_connection_error(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. RFC 9113 §5.1.1: a new stream id must be greater than every
    id the client opened; a smaller (idle-looking, never used) one is a connection error
    PROTOCOL_ERROR. ``ServerConnection.on_header_block`` drops the HEADERS silently
    (``sid <= last_peer_stream``: "a stream we reset already"), so the client's call on
    stream 1 is never answered and never refused: it hangs until the client's deadline."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    client = await Client.connect(gw)
    client.headers(5, authority=b"nobody.fraud.localhost", end=True)
    await client.until(f.HEADERS, sid=5)
    client.headers(1, authority=b"nobody.fraud.localhost", end=True)
    client.send(f.frame(f.PING, 0, 0, b"stream 1"))
    frames = await until_goaway_or_ping(client)
    answered = [fr for fr in frames if fr[2] == 1 and fr[0] in (f.HEADERS, f.RST_STREAM)]
    assert answered or goaway_code(frames) == f.PROTOCOL_ERROR, "stream 1 silently dropped"
    await client.close()


# --- 6. the preface's SETTINGS, when the preface arrives on its own ---------------------------


async def test_the_first_frame_must_be_settings_even_after_a_split_preface(
    gateway_factory: Any, hang: Hang
) -> None:
    """Was a bug. RFC 9113 §3.4: the client preface's SETTINGS frame comes
    first. ``ServerConnection.data_received`` checks the first frame type only when it
    arrives in the same read as the preface's end (``len(rest) >= 4``); a preface read on
    its own lets any frame come first."""
    gw = await gateway_to(gateway_factory, f"127.0.0.1:{hang.port}")
    assert gw.worker is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.grpc_port)
    client = Client(reader, writer)
    client.send(f.PREFACE)
    await writer.drain()
    async with asyncio.timeout(20):
        while not server_conn(gw).preface_done:
            await asyncio.sleep(0.01)
    client.send(f.frame(f.PING, 0, 0, b"no-setng"))
    frames = await until_goaway_or_ping(client)
    assert goaway_code(frames) == f.PROTOCOL_ERROR
    await client.close()


# --- 7. response bytes queued for a client that doesn't read: the per-connection bound -------


async def _echo(body: bytes, context: Any) -> bytes:
    return body


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    import grpc

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        "caraml.upi.v1.UniversalPredictionService",
        {"PredictValues": grpc.unary_unary_rpc_method_handler(_echo)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_responses_queued_for_a_non_reading_client_are_bounded_per_connection(
    gateway_factory: Any, echo: str
) -> None:
    """Was a bug. A client that grants no stream window (it never reads)
    makes the gateway queue each response in ``Stream.pending``. While the replica's
    stream is open that is bounded by the windows we granted the replica (1 MiB per
    stream, 16 MiB per upstream connection). But when the replica's stream ends,
    ``Flow.settle`` credits the upstream connection for every byte still queued
    toward the client, so the 16 MiB connection bound no longer holds: one client
    connection can make the gateway hold ~1 MiB for each of its 1000 streams (~1 GiB),
    and the design's "no buffer of ours to bound" is not true. Here 24 sequential 1 MiB
    echo calls leave 24 MiB queued in the gateway for one connection."""
    gw = await gateway_to(gateway_factory, echo)
    client = await Client.connect(gw, {f.SETTINGS_INITIAL_WINDOW_SIZE: 0})
    body = b"\x07" * (1024 * 1024 - 64)
    calls = 24
    conn: ServerConnection | None = None
    for i in range(calls):
        sid = 2 * i + 1
        client.headers(sid)
        client.message(sid, body)
        if conn is None:
            conn = server_conn(gw)
        async with asyncio.timeout(30):
            while not call_done(gw, sid):
                assert not conn.closed
                await asyncio.sleep(0.01)
    assert conn is not None
    queued = sum(
        len(item[0]) for stream in conn.streams.values() for item in stream.pending if item[1] == 0
    )
    await client.close()
    assert queued <= 16 * 1024 * 1024, f"{queued} response bytes queued for one connection"


# --- 8. a replica's SETTINGS_MAX_CONCURRENT_STREAMS under a burst -------------------------------


class Limited(RawServer):
    """A raw h2c replica that allows ``limit`` concurrent streams (SETTINGS first thing,
    as RFC 9113 §3.4 wants), refuses streams over it with REFUSED_STREAM (as grpc-core
    and nghttp2 do), and answers each accepted call with a one-message OK a moment
    later."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        self.answered = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hpack

        self.connections += 1
        encoder = hpack.Encoder()
        open_: set[int] = set()
        tasks: set[asyncio.Task[None]] = set()

        async def answer(sid: int) -> None:
            await asyncio.sleep(0.2)  # keeps the call in flight; nothing is timed
            if sid not in open_:
                return
            open_.discard(sid)
            head = encoder.encode([(b":status", b"200"), (b"content-type", b"application/grpc")])
            tail = encoder.encode([(b"grpc-status", b"0")])
            writer.write(
                f.frame(f.HEADERS, f.END_HEADERS, sid, head)
                + f.frame(f.DATA, 0, sid, b"\x00\x00\x00\x00\x02ok")
                + f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, tail)
            )
            self.answered += 1

        try:
            await reader.readexactly(len(f.PREFACE))
            writer.write(f.settings_frame({f.SETTINGS_MAX_CONCURRENT_STREAMS: self.limit}))
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & f.MAX_STREAM_ID
                if ftype == f.SETTINGS and not flags & f.ACK:
                    writer.write(f.SETTINGS_ACK)
                elif ftype == f.PING and not flags & f.ACK:
                    writer.write(f.frame(f.PING, f.ACK, 0, payload))
                elif ftype == f.HEADERS:
                    if len(open_) >= self.limit:
                        self.refused += 1
                        writer.write(f.rst_stream(sid, f.REFUSED_STREAM))
                        continue
                    open_.add(sid)
                elif ftype == f.RST_STREAM:
                    open_.discard(sid)
                if ftype in (f.HEADERS, f.DATA) and flags & f.END_STREAM and sid in open_:
                    task = asyncio.ensure_future(answer(sid))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        for task in list(tasks):
            task.cancel()
        writer.close()


async def test_a_burst_over_a_replicas_stream_limit_opens_more_connections(
    gateway_factory: Any,
) -> None:
    """Was a bug. docs/grpc-design.md: MAX_CONCURRENT_STREAMS is respected and
    "the pool opens another connection, up to 16 per replica". But every call that
    finds no usable connection awaits the *same* pending connect
    (``UpstreamPool.connect``); once the new connection is full (its SETTINGS said 2),
    the remaining waiters see ``not conn.usable()`` in ``GrpcCall._connect`` and call
    ``_retry`` with the replica *excluded*, as if it had refused: with one replica that
    is UNAVAILABLE "no replica left" for 6 of 10 calls the pool could have carried on
    more connections (and a retry is spent and counted for each, on a healthy replica).
    If the waiters resume before the SETTINGS arrive, they instead all open streams on
    the fresh connection and the replica refuses the excess (same outcome)."""
    import grpc

    replica = await Limited(2).start()
    try:
        gw = await gateway_to(gateway_factory, f"127.0.0.1:{replica.port}")
        assert gw.worker is not None
        options = [("grpc.default_authority", "scorer.fraud.localhost")]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{gw.worker.grpc_port}", options=options
        ) as ch:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/caraml.upi.v1.UniversalPredictionService/PredictValues"
            )
            assert await call(b"warm", timeout=10) == b"ok"  # conn 1, SETTINGS known
            results = await asyncio.gather(
                *(call(b"x", timeout=10) for _ in range(10)), return_exceptions=True
            )
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, (
            f"{len(failed)} of 10 calls failed ({failed[0]!r}); replica refused "
            f"{replica.refused} streams over {replica.connections} connections"
        )
    finally:
        await replica.stop()


# --- 9. DEADLINE_EXCEEDED after the response started, toward a slow reader --------------------


class Talker(RawServer):
    """A raw h2c replica that starts every response (HEADERS and 20000 bytes of DATA) at
    once and never finishes it."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hpack

        encoder = hpack.Encoder()
        try:
            await reader.readexactly(len(f.PREFACE))
            writer.write(f.settings_frame({}))
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & f.MAX_STREAM_ID
                if ftype == f.SETTINGS and not flags & f.ACK:
                    writer.write(f.SETTINGS_ACK)
                elif ftype == f.PING and not flags & f.ACK:
                    writer.write(f.frame(f.PING, f.ACK, 0, payload))
                elif ftype == f.HEADERS:
                    block = encoder.encode(
                        [(b":status", b"200"), (b"content-type", b"application/grpc")]
                    )
                    body = b"\x00" + (19995).to_bytes(4, "big") + b"r" * 19995
                    writer.write(
                        f.frame(f.HEADERS, f.END_HEADERS, sid, block)
                        + f.frame(f.DATA, 0, sid, body[:16384])
                        + f.frame(f.DATA, 0, sid, body[16384:])
                    )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def test_deadline_status_reaches_a_streaming_client_behind_queued_data(
    gateway_factory: Any,
) -> None:
    """Was a bug. When the deadline passes after the response started,
    ``GrpcCall._deadline`` queues the DEADLINE_EXCEEDED trailers behind the response DATA
    still waiting for the client's window, then ``_end_client`` resets the client's
    stream (NO_ERROR) because the client has not half-closed: ``reset_stream`` clears
    ``pending``, so the trailers are thrown away and the client gets RST_STREAM(NO_ERROR)
    mid-response, with no grpc-status at all (RFC 9113 §8.1 allows that reset only
    *after* a complete response)."""
    talker = await Talker().start()
    try:
        gw = await gateway_to(gateway_factory, f"127.0.0.1:{talker.port}")
        client = await Client.connect(gw, {f.SETTINGS_INITIAL_WINDOW_SIZE: 0})
        client.headers(1, grpc_timeout="300m")
        client.message(1, b"\x0a\x00", end=False)  # a client-streaming call, still open
        seen = await client.until(f.HEADERS, sid=1)  # response headers
        async with asyncio.timeout(20):  # the deadline passes in the gateway
            while not call_done(gw, 1):
                await asyncio.sleep(0.02)
        client.send(f.window_update(0, 1 << 20) + f.window_update(1, 1 << 20))
        client.send(f.frame(f.PING, 0, 0, b"drained!"))
        seen += await until_goaway_or_ping(client)
        ends = [fr for fr in seen if fr[2] == 1 and fr[0] == f.HEADERS and fr[1] & f.END_STREAM]
        kinds = [(fr[0], fr[1]) for fr in seen if fr[2] == 1]
        assert ends, f"no trailers on stream 1, only {kinds}"
        assert client.decode(ends[0][3])[b"grpc-status"] == b"4"
        await client.close()
    finally:
        await talker.stop()


# --- 10. one slow client starving every call on a shared replica connection -------------------


class Hoarder(RawServer):
    """A raw h2c replica that honours flow control. A call with ``x-big: 1`` gets a
    response that fills its stream window (and never ends); any other call gets a small
    OK as soon as the connection window allows."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.small_answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import hpack

        encoder = hpack.Encoder()
        decoder = hpack.Decoder()
        conn_window = f.DEFAULT_WINDOW
        stream_initial = f.DEFAULT_WINDOW
        waiting: list[int] = []
        head_block = encoder.encode([(b":status", b"200"), (b"content-type", b"application/grpc")])

        def small(sid: int) -> None:
            nonlocal conn_window
            conn_window -= 7
            tail = encoder.encode([(b"grpc-status", b"0")])
            writer.write(
                f.frame(f.HEADERS, f.END_HEADERS, sid, head_block)
                + f.frame(f.DATA, 0, sid, b"\x00\x00\x00\x00\x02ok")
                + f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, sid, tail)
            )
            self.small_answered += 1

        try:
            await reader.readexactly(len(f.PREFACE))
            writer.write(f.settings_frame({}))
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & f.MAX_STREAM_ID
                if ftype == f.SETTINGS and not flags & f.ACK:
                    for key, value in f.parse_settings(payload):
                        if key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                            stream_initial = value
                    writer.write(f.SETTINGS_ACK)
                elif ftype == f.PING and not flags & f.ACK:
                    writer.write(f.frame(f.PING, f.ACK, 0, payload))
                elif ftype == f.WINDOW_UPDATE and sid == 0:
                    conn_window += f.u32(payload)
                    while waiting and conn_window >= 7:
                        small(waiting.pop(0))
                elif ftype == f.HEADERS:
                    fields = dict(decoder.decode(payload, raw=True))
                    if fields.get(b"x-big") == b"1":
                        n = min(stream_initial, conn_window)
                        conn_window -= n
                        out = [f.frame(f.HEADERS, f.END_HEADERS, sid, head_block)]
                        for i in range(0, n, f.DEFAULT_MAX_FRAME):
                            size = min(f.DEFAULT_MAX_FRAME, n - i)
                            out.append(f.frame(f.DATA, 0, sid, b"\x00" * size))
                        writer.write(b"".join(out))
                    elif conn_window >= 7:
                        small(sid)
                    else:
                        waiting.append(sid)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def test_a_client_that_stops_reading_does_not_stall_other_clients_calls(
    gateway_factory: Any,
) -> None:
    """Was a bug. Connection-level flow control toward a replica is end to
    end too: response bytes are credited to the replica's connection only once written
    to the client. One client that stops reading (window 0) and opens 16 calls with big
    responses holds the whole 16 MiB window of the *shared* pooled connection; every
    other client's call on that connection then waits for the attacker's calls to end
    (their deadline: 30 s by default). The pool still calls the connection ``usable()``
    (only the stream count is checked), so it opens no other. Here a second client's
    small call cannot complete while the first client's calls are held."""
    import grpc

    hoarder = await Hoarder().start()
    try:
        gw = await gateway_to(gateway_factory, f"127.0.0.1:{hoarder.port}")
        assert gw.worker is not None and gw.worker.grpc is not None
        attacker = await Client.connect(gw, {f.SETTINGS_INITIAL_WINDOW_SIZE: 0})
        for i in range(16):
            sid = 2 * i + 1
            attacker.headers(sid, x_big="1")
            attacker.message(sid, b"")
        # The attacker's calls now hold 16 x 1 MiB of replies in the gateway (as much as
        # the replica's whole connection window used to be).
        [held] = gw.worker.grpc_listener.connections  # type: ignore[union-attr]
        async with asyncio.timeout(20):
            while held.queued_bytes() < 15 * 1024 * 1024:
                await asyncio.sleep(0.02)
        options = [("grpc.default_authority", "scorer.fraud.localhost")]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{gw.worker.grpc_port}", options=options
        ) as ch:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/caraml.upi.v1.UniversalPredictionService/PredictValues"
            )
            try:
                reply = await call(b"victim", timeout=3)
            except grpc.aio.AioRpcError as exc:
                pytest.fail(f"an unrelated client's call failed: {exc.code()} {exc.details()}")
        assert reply == b"ok"
        await attacker.close()
    finally:
        await hoarder.stop()


# --- 11. request trailers on a replayed call ---------------------------------------------------


class GoawayOnce(RawServer):
    """A raw h2c replica: its first connection holds the first call and answers the
    second HEADERS with GOAWAY(last = the first call), so the second call is retried on
    a fresh connection; later connections record what they receive and never answer."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.first: int | None = None
        self.later: list[bytearray] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_conn = not self.later and self.first is None
        record = bytearray()
        if not first_conn:
            self.later.append(record)
        try:
            await reader.readexactly(len(f.PREFACE))
            writer.write(f.settings_frame({}))
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                record += head + payload
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & f.MAX_STREAM_ID
                if ftype == f.SETTINGS and not flags & f.ACK:
                    writer.write(f.SETTINGS_ACK)
                elif ftype == f.HEADERS and first_conn:
                    if self.first is None:
                        self.first = sid
                    elif sid != self.first:
                        writer.write(f.goaway(self.first, f.NO_ERROR))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def test_a_replayed_call_keeps_the_clients_request_trailers(gateway_factory: Any) -> None:
    """Was a bug (low severity: gRPC clients rarely send request trailers).
    ``GrpcCall.client_trailers`` sends trailers straight to an open replica stream and
    keeps no copy (``req_trailers`` stays None); when that stream is then refused
    (GOAWAY below its id) and the call is replayed, ``_open`` ends the replayed body with
    END_STREAM on its last DATA frame: the trailers are lost."""
    from tests.test_h2_frames import parse_frames

    replica = await GoawayOnce().start()
    try:
        gw = await gateway_to(gateway_factory, f"127.0.0.1:{replica.port}")
        client = await Client.connect(gw)
        client.headers(1, end=True)  # held by the replica's first connection
        async with asyncio.timeout(20):
            while replica.first is None:
                await asyncio.sleep(0.01)
        client.headers(3)
        client.message(3, b"\x0a\x00", end=False)
        block = client.encoder.encode([(b"x-trailer", b"kept")])
        client.send(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, 3, block))
        async with asyncio.timeout(20):
            while not any(
                fr[1] & f.END_STREAM for rec in replica.later for fr in parse_frames(bytes(rec))
            ):
                await asyncio.sleep(0.01)
        [rec] = replica.later
        frames = [fr for fr in parse_frames(bytes(rec)) if fr[0] in (f.HEADERS, f.DATA)]
        kinds = [(fr[0], fr[1] & f.END_STREAM) for fr in frames]
        assert kinds[-1] == (f.HEADERS, f.END_STREAM), f"replayed as {kinds}: trailers lost"
        await client.close()
    finally:
        await replica.stop()


# --- 12. HPACK decode cache vs. eviction (passes: covers an untested path) ---------------------


def test_the_decode_cache_never_serves_a_block_across_an_eviction() -> None:
    """PASSES (coverage). The decode cache must not replay a block whose indexed fields
    now name other entries. Eviction that keeps the table's length (one entry in, one
    out, in a table that fits one) and a size update that empties the table both
    invalidate it; the second makes the cached reference undecodable (an error, not the
    stale fields)."""
    from merlin_dp.gateway.h2.codec import HeaderBlockError, HeaderDecoder

    dec = HeaderDecoder(16 * 1024)
    size_update_64 = bytes((0x3F, 64 - 31))  # dynamic table size update to 64 bytes
    add_a = size_update_64 + b"\x40\x03x-a\x011"  # literal, incremental indexing: x-a: 1
    ref = b"\xbe"  # indexed field 62: the newest dynamic entry
    add_b = b"\x40\x03x-b\x012"  # x-b: 2 evicts x-a (each is 36 bytes of 64)
    assert dec.decode(add_a).headers == [(b"x-a", b"1")]
    assert dec.decode(ref).headers == [(b"x-a", b"1")]
    assert dec.decode(ref).headers == [(b"x-a", b"1")]  # from the cache
    assert dec.decode(add_b).headers == [(b"x-b", b"2")]
    assert dec.decode(ref).headers == [(b"x-b", b"2")]
    empty = b"\x20" + size_update_64  # size 0, then 64 again: the table is emptied
    assert dec.decode(empty + b"\x82").headers == [(b":method", b"GET")]
    with pytest.raises(HeaderBlockError):
        dec.decode(ref)
