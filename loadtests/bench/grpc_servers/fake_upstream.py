"""``python -m loadtests.bench.grpc_servers.fake_upstream --port P``: a fast h2c gRPC fake
upstream.

The gRPC benchmark's upstream: it answers every stream with the same unary gRPC response
(``200``, ``content-type: application/grpc``, one length-prefixed message, trailers
``grpc-status: 0``), :func:`fake_response` serialized, so the proxies in front of it are
what gets measured, not the upstream.

HTTP/2 over cleartext with prior knowledge (what gRPC clients, nginx ``grpc_pass`` and the
gateway speak), with frames handled by hand on an asyncio protocol (uvloop when run as a
program); a request's headers are never decoded, so the peer's HPACK state doesn't matter,
and the answer's headers are stateless HPACK literals. It does what a correct peer needs:
the preface, SETTINGS and their ACK, PING ACK, connection-level flow control both ways
(it grants itself a large receive window and replenishes it; answers wait while the
peer's connection window is spent), CONTINUATION, padding, RST_STREAM and GOAWAY. It
answers a stream once the request's END_STREAM arrives, whatever its ``:path``.
Not a general server: no stream-level send windows beyond the initial one (answers are
tiny), no priorities, no server push.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import cast

from merlin_dp.protos.caraml.upi.v1 import table_pb2, type_pb2, upi_pb2

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
# Replenish the receive window once this much of it has been consumed.
WINDOW_REFILL = 2**30


def fake_response() -> upi_pb2.PredictValuesResponse:
    """What the fake answers: a one-row ``scores`` table, as a UPI model would."""
    return upi_pb2.PredictValuesResponse(
        prediction_result_table=table_pb2.Table(
            name="scores",
            columns=[table_pb2.Column(name="score", type=type_pb2.TYPE_DOUBLE)],
            rows=[table_pb2.Row(row_id="r1", values=[table_pb2.Value(double_value=3.0)])],
        ),
        metadata=upi_pb2.ResponseMetadata(
            prediction_id="bench", models=[upi_pb2.ModelMetadata(name="m", version="1")]
        ),
    )


def grpc_frame(message: bytes, *, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message: compressed flag, 4-byte big-endian length, bytes."""
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def _hpack_string(text: bytes) -> bytes:
    if len(text) >= 127:
        raise ValueError("header strings of the fake stay under 127 bytes")
    return bytes([len(text)]) + text


# `:status: 200` is static-table entry 8 (indexed: 0x80 | 8). `content-type` is static
# entry 31: a literal without indexing with an indexed name (4-bit prefix: 15, then 16).
RESPONSE_HEADER_BLOCK = b"\x88" + b"\x0f\x10" + _hpack_string(b"application/grpc")
# Trailers: a literal without indexing with a new name.
TRAILER_BLOCK = b"\x00" + _hpack_string(b"grpc-status") + _hpack_string(b"0")


class ResponseTemplate:
    """The three frames of one answer, with the stream id left to fill in."""

    def __init__(self, message: bytes) -> None:
        body = grpc_frame(message)
        self.body_length = len(body)
        head = frame(HEADERS, FLAG_END_HEADERS, 0, RESPONSE_HEADER_BLOCK)
        data = frame(DATA, 0, 0, body)
        trailers = frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 0, TRAILER_BLOCK)
        # Each frame is its 5-byte head, the 4-byte stream id, then the rest.
        self._parts = (head[:5], head[9:] + data[:5], data[9:] + trailers[:5], trailers[9:])

    def render(self, stream_id: int) -> bytes:
        sid = stream_id.to_bytes(4, "big")
        a, b, c, d = self._parts
        return a + sid + b + sid + c + sid + d


class FakeGrpcProtocol(asyncio.Protocol):
    """One h2c connection answering every request stream with the template."""

    def __init__(self, template: ResponseTemplate) -> None:
        self._template = template
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._preface_seen = False
        self._send_window = DEFAULT_WINDOW  # the peer's connection window for our DATA
        self._consumed = 0  # DATA bytes received since our last WINDOW_UPDATE
        self._waiting: collections.deque[int] = collections.deque()
        self._continuation_ends: int | None = None  # stream whose END_STREAM awaits headers
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's isn't a subclass
        self._transport = transport
        settings = SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + MAX_WINDOW.to_bytes(4, "big")
        transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        if not self._preface_seen:
            if len(buf) < len(PREFACE):
                self._buffer = buf
                return
            if not buf.startswith(PREFACE):
                self._abort()
                return
            self._preface_seen = True
            pos = len(PREFACE)
        out = bytearray()
        end_of_buffer = len(buf)
        while end_of_buffer - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            end = pos + 9 + length
            if end > end_of_buffer:
                break
            ftype = buf[pos + 3]
            flags = buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            if ftype == DATA:
                self._consumed += length
                if flags & FLAG_END_STREAM:
                    self._answer(stream_id, out)
            elif ftype == HEADERS:
                if flags & FLAG_END_STREAM:
                    if flags & FLAG_END_HEADERS:
                        self._answer(stream_id, out)
                    else:
                        self._continuation_ends = stream_id
            elif ftype == CONTINUATION:
                if flags & FLAG_END_HEADERS and self._continuation_ends == stream_id:
                    self._continuation_ends = None
                    self._answer(stream_id, out)
            elif ftype == SETTINGS:
                if not flags & FLAG_ACK:
                    self._settings(buf[pos + 9 : end])
                    out += frame(SETTINGS, FLAG_ACK, 0)
            elif ftype == PING:
                if not flags & FLAG_ACK:
                    out += frame(PING, FLAG_ACK, 0, buf[pos + 9 : end])
            elif ftype == WINDOW_UPDATE:
                if stream_id == 0 and length == 4:
                    self._send_window += int.from_bytes(buf[pos + 9 : end], "big") & 0x7FFF_FFFF
                    while self._waiting and self._send_window >= self._template.body_length:
                        self._answer(self._waiting.popleft(), out)
            elif ftype == GOAWAY:
                self._closing = True
            # PRIORITY, RST_STREAM (the answer went already or goes harmlessly), others:
            # nothing to do.
            pos = end
        self._buffer = buf[pos:]
        if self._consumed >= WINDOW_REFILL:
            out += frame(WINDOW_UPDATE, 0, 0, self._consumed.to_bytes(4, "big"))
            self._consumed = 0
        transport = self._transport
        if transport is None:
            return
        if out:
            transport.write(bytes(out))
        if self._closing and not self._waiting:
            transport.close()

    def _answer(self, stream_id: int, out: bytearray) -> None:
        if self._send_window < self._template.body_length:
            self._waiting.append(stream_id)
            return
        self._send_window -= self._template.body_length
        out += self._template.render(stream_id)

    def _settings(self, payload: bytes) -> None:
        # The peer's stream-level initial window: our answers are far below any sane one.
        for i in range(0, len(payload) - 5, 6):
            if int.from_bytes(payload[i : i + 2], "big") == SETTINGS_INITIAL_WINDOW_SIZE:
                window = int.from_bytes(payload[i + 2 : i + 6], "big")
                if window < self._template.body_length:
                    self._abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def start_server(
    host: str, port: int, message: bytes | None = None
) -> asyncio.base_events.Server:
    """Listen on `host:port` (0: any free port), answering with `message` (serialized
    bytes; :func:`fake_response` by default)."""
    body = message if message is not None else fake_response().SerializeToString()
    template = ResponseTemplate(body)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: FakeGrpcProtocol(template), host, port, backlog=4096, reuse_address=True
    )


async def serve(host: str, port: int) -> None:
    server = await start_server(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        print(f"grpc fake upstream on {host}:{port}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench.grpc_servers.fake_upstream",
        description="h2c gRPC fake answering every call with a fixed PredictValuesResponse",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(serve(args.host, args.port))
    else:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
