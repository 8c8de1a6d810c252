"""``grpc.health.v1.Health``, answered by the gateway for the endpoint ``:authority`` names.

A probe learns what a call to that endpoint would meet now, and no replica is asked:

- ``Check`` answers SERVING when the endpoint can serve a call: a version endpoint that
  has a ready replica in the route table, or is scaled to zero with the gateway able to
  activate it (the call would be held while a replica starts); a model endpoint when one
  of the versions its weights send calls to can (a version reached only by a header
  match, or the mirror, doesn't count: ordinary calls never go there). NOT_SERVING
  otherwise. A check activates nothing and is not counted as traffic, so probes neither
  wake a version at zero nor keep it from scaling down.
- The request's ``service``: ``""`` and ``caraml.upi.v1.UniversalPredictionService`` (the
  one service a UPI_V1 endpoint serves) both ask about the endpoint; any other name is
  NOT_FOUND, as grpc's own health service answers for a service it doesn't know.
- ``Watch`` and ``List`` answer UNIMPLEMENTED (a gRPC client's own health checking then
  treats the endpoint as healthy: gRFC A17).

Routing is the proxied call's (:mod:`merlin_dp.gateway.grpc.proxy`): an unknown ``:authority`` is
NOT_FOUND and an HTTP_JSON endpoint UNIMPLEMENTED before a check gets here. The request
is decoded by hand (its one string field; protobuf's rules for fields we don't know,
gzip and deflate messages inflated with a bound), and so is the response (one enum).
"""

from __future__ import annotations

import asyncio
import zlib
from types import MappingProxyType

from merlin_dp.gateway.grpc.status import (
    CONTENT_TYPE,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    RESOURCE_EXHAUSTED,
    STATUS_200,
    UNIMPLEMENTED,
    trailers,
    trailers_only,
)
from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.codec import Block
from merlin_dp.gateway.h2.streams import Stream
from merlin_dp.gateway.routing.table import DIRECT_POLICY, ModelTarget, Target, describe

PREFIX = b"/grpc.health.v1.Health/"
CHECK = PREFIX + b"Check"
UPI_SERVICE = "caraml.upi.v1.UniversalPredictionService"
# HealthCheckResponse.ServingStatus
SERVING = 1
NOT_SERVING = 2
# A HealthCheckRequest is one service name: anything bigger is not one.
MAX_REQUEST = 4096
# grpc-encoding → zlib's wbits: gzip framing, or zlib's (gRPC's "deflate").
_WBITS = MappingProxyType({b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS})


class HealthError(Exception):
    """A Check that can't be answered SERVING or NOT_SERVING: the call ends with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def begin(
    stream: Stream,
    target: Target,
    path: bytes,
    block: Block,
    timeout: float | None,
    loop: asyncio.AbstractEventLoop,
    can_activate: bool,
) -> None:
    """A health call on ``stream`` for ``target``: Check waits for its request; the
    other methods are answered at once. ``can_activate``: the gateway can start a version
    scaled to zero (a call to one would be held, not refused)."""
    if path != CHECK:
        method = path.decode("latin-1").lstrip("/")
        answer(stream, UNIMPLEMENTED, f"{method} is not served by the gateway; call Check")
        return
    call = HealthCall(stream, target, block, timeout, loop, can_activate)
    stream.handler = call
    if stream.remote_closed:
        call.request_end()


def answer(stream: Stream, code: int, message: str) -> None:
    """A Trailers-Only status; a request still streaming is told to stop (RFC 9113 §8.1)."""
    if not stream.open:
        return
    stream.send_headers(trailers_only(code, message), True)
    if stream.open and not stream.remote_closed and not stream.pending:
        stream.reset(f.NO_ERROR)


class HealthCall:
    """One ``Check``: its request message collected (bounded), then the answer."""

    __slots__ = ("body", "can_activate", "done", "encoding", "size", "stream", "target", "timer")

    def __init__(
        self,
        stream: Stream,
        target: Target,
        block: Block,
        timeout: float | None,
        loop: asyncio.AbstractEventLoop,
        can_activate: bool,
    ) -> None:
        self.can_activate = can_activate
        self.stream = stream
        self.target = target
        self.body: list[bytes] = []
        self.size = 0
        self.done = False
        self.encoding = b"identity"
        for name, value in block.headers:
            if name == b"grpc-encoding":
                self.encoding = value
        # A client that never finishes its request must not hold the stream for good.
        limit = DIRECT_POLICY.timeout
        self.timer: asyncio.TimerHandle | None = loop.call_later(
            limit if timeout is None else min(timeout, limit), self._deadline
        )

    def on_headers(self, stream: Stream, block: Block, end_stream: bool) -> None:
        pass  # a client's trailers arrive through GrpcProxy.trailers → request_end

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        stream.consumed(len(data))
        if self.done:
            return
        self.size += len(data)
        if self.size > 5 + MAX_REQUEST:
            self._fail(RESOURCE_EXHAUSTED, f"a health check request over {MAX_REQUEST} bytes")
            return
        self.body.append(data)
        if end_stream:
            self.request_end()

    def on_reset(self, stream: Stream, code: int) -> None:
        self._finish()

    def request_end(self) -> None:
        if self.done:
            return
        try:
            service = read_request(b"".join(self.body), self.encoding)
        except HealthError as exc:
            self._fail(exc.code, str(exc))
            return
        target = self.target
        if service and service != UPI_SERVICE:
            self._fail(
                NOT_FOUND, f"unknown service {service!r}: {describe(target)} serves {UPI_SERVICE}"
            )
            return
        status = SERVING if serving(target, self.can_activate) else NOT_SERVING
        self._finish()
        stream = self.stream
        if stream.open:
            stream.send_headers(STATUS_200 + CONTENT_TYPE, False)
            stream.send_data(response(status), False)
            stream.send_headers(trailers(OK, ""), True)

    def _deadline(self) -> None:
        self.timer = None
        self._fail(DEADLINE_EXCEEDED, "deadline exceeded")

    def _fail(self, code: int, message: str) -> None:
        if self.done:
            return
        self._finish()
        answer(self.stream, code, message)

    def _finish(self) -> None:
        self.done = True
        self.body = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def serving(target: Target, can_activate: bool) -> bool:
    """Whether a call to ``target`` would be served now (see the module's docstring)."""
    versions = dict.fromkeys(target.slots) if isinstance(target, ModelTarget) else (target,)
    return any(v.upstreams or (v.scale_to_zero and can_activate) for v in versions)


def response(status: int) -> bytes:
    """A HealthCheckResponse (field 1, an enum) as one uncompressed gRPC message."""
    return b"\x00\x00\x00\x00\x02\x08" + bytes((status,))


def read_request(body: bytes, encoding: bytes) -> str:
    """The ``service`` a Check asks about, from its request: one length-prefixed message."""
    if len(body) < 5 or len(body) != 5 + int.from_bytes(body[1:5], "big"):
        raise HealthError(INVALID_ARGUMENT, "a Check call carries one HealthCheckRequest")
    message = body[5:]
    if body[0] == 1:
        message = inflate(message, encoding)
    elif body[0] != 0:
        raise HealthError(INTERNAL, f"bad compressed flag {body[0]}")
    try:
        return service_field(message)
    except ValueError as exc:
        raise HealthError(INVALID_ARGUMENT, f"malformed HealthCheckRequest: {exc}") from None


def inflate(data: bytes, encoding: bytes) -> bytes:
    wbits = _WBITS.get(encoding)
    if wbits is None:
        # doc/compression.md: a message in an encoding the server doesn't support.
        name = encoding.decode("latin-1")
        raise HealthError(UNIMPLEMENTED, f"message compressed with {name!r}: gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, MAX_REQUEST + 1)
    except zlib.error as exc:
        name = encoding.decode("latin-1")
        raise HealthError(INTERNAL, f"could not inflate the {name} message: {exc}") from None
    if len(out) > MAX_REQUEST:
        raise HealthError(RESOURCE_EXHAUSTED, f"a health check request over {MAX_REQUEST} bytes")
    if not inflater.eof:
        raise HealthError(INTERNAL, "the compressed message is truncated")
    return out


def service_field(message: bytes) -> str:
    """HealthCheckRequest.service, field 1 (a string). Other fields are skipped by their
    wire type, and the last occurrence wins, as protobuf parsers do."""
    service = b""
    pos = 0
    end = len(message)
    while pos < end:
        key, pos = _varint(message, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            _, pos = _varint(message, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(message, pos)
            if number == 1:
                service = message[pos : pos + size]
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} of field {number}")
        if pos > end:
            raise ValueError("truncated")
    return service.decode("utf-8")  # proto3 strings are UTF-8; a UnicodeDecodeError is one


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint over 10 bytes")
    raise ValueError("truncated varint")
