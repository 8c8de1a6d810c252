"""A client's request as the HTTP front hands it to the proxy: its head, parsed once,
and its body as it arrives.

The head keeps the header lines exactly as they came (``raw``), because they are
forwarded as they came; the few fields the gateway itself acts on are picked out while
parsing (:class:`HttpRequest`). Header matches of a route look names up
case-insensitively through :class:`RequestHeaders`, which scans the few raw lines
instead of building a dict no one else needs.

The body goes into a :class:`RequestBody`: a small one is usually whole by the time
the proxy looks (it came in the same read as the head); a large or chunked one is read
piece by piece while it arrives, and the connection stops reading from the client
while more than ``BODY_HIGH_WATER`` bytes wait (the proxy drains them into the
replica's connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

# Body bytes buffered from a client before the connection stops reading from it.
BODY_HIGH_WATER = 256 * 1024


class BadBody(Exception):
    """The body's framing turned out malformed (a bad chunk) after its head was passed
    on: ``answer`` is the connection's error answer to send instead."""

    def __init__(self, answer: bytes) -> None:
        super().__init__("the request body's framing is malformed")
        self.answer = answer


class ClientSide(Protocol):
    """What a request needs of its connection (an
    :class:`~merlin_dp.gateway.http.connection.HttpConnection`)."""

    loop: asyncio.AbstractEventLoop
    peer: bytes
    write_paused: bool

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def abort(self) -> None: ...
    def pause_for_body(self) -> None: ...
    def body_drained(self) -> None: ...
    def answered(self, request: HttpRequest) -> None: ...
    def follow(self, work: Coroutine[Any, Any, None]) -> None: ...


_KEYS: dict[str, bytes] = {}  # header name -> its lowercase bytes


class RequestHeaders:
    """Case-insensitive lookup over a request's raw header lines (the first match)."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: str, default: str | None = None) -> str | None:
        key = _KEYS.get(name)
        if key is None:
            key = name.encode("latin-1").lower()
            if len(_KEYS) < 1024:  # the names routes match on: few
                _KEYS[name] = key
        size = len(key)
        for header, value in self.raw:
            if len(header) == size and header.lower() == key:
                return value.decode("latin-1")
        return default


class RequestBody:
    """The bytes of one request body, as they arrive from the client."""

    __slots__ = ("_waiter", "buffered", "chunks", "conn", "eof", "error", "received")

    def __init__(self, conn: ClientSide) -> None:
        self.conn = conn
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.received = 0  # body bytes taken from the client so far
        self.eof = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- the connection's side ------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.conn.pause_for_body()
        self._wake()

    def end(self) -> None:
        self.eof = True
        self._wake()

    @property
    def waiting(self) -> bool:
        """Whether a reader waits for more."""
        return self._waiter is not None

    def fail(self, error: BaseException) -> None:
        if not self.eof:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- the proxy's side -----------------------------------------------------------

    def take(self) -> bytes:
        """Every byte that arrived and was not taken yet."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        held_back = self.buffered > BODY_HIGH_WATER
        self.buffered = 0
        if held_back:
            self.conn.body_drained()
        return data

    async def read_any(self) -> bytes:
        """The next bytes of the body; b"" at its end. Raises :class:`ClientGone` when
        the client left (or its body turned out malformed) before the end."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            waiter = self._waiter = self.conn.loop.create_future()
            await waiter
        return self.take()

    async def read_all(self) -> bytes:
        """The whole body (the caller has checked that its size is bounded)."""
        while not self.eof:
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self.conn.loop.create_future()
            await waiter
        return self.take()


class HttpRequest:
    """One request head, as parsed, and its body."""

    __slots__ = (
        "answer_started",
        "body",
        "chunked",
        "conn",
        "connection",
        "content_length",
        "expect_continue",
        "hop",
        "host",
        "http10",
        "keep_alive",
        "method",
        "on_gone",
        "raw",
        "request_id",
        "target",
        "transfer_encoding",
    )

    def __init__(self, conn: ClientSide) -> None:
        self.conn = conn
        # Set when the head is whole: the method, and the request-target as sent,
        # decoded byte for byte (latin-1), so that it goes on as it came.
        self.method = ""
        self.target = ""
        self.raw: list[tuple[bytes, bytes]] = []
        self.http10 = False
        self.keep_alive = True
        # A header that is hop-by-hop, or that the forwarded head changes, is present.
        self.hop = False
        self.host = ""
        self.content_length: int | None = None
        self.chunked = False
        self.transfer_encoding: bytes | None = None
        self.expect_continue = False
        self.request_id: bytes | None = None
        self.connection: bytes | None = None
        self.body: RequestBody | None = None  # None: the request has no body
        # Called when the client leaves while the answer is made by callbacks (no task
        # to cancel).
        self.on_gone: Callable[[], None] | None = None
        self.answer_started = False  # a streamed answer's head is out: no error can follow

    @property
    def headers(self) -> RequestHeaders:
        """The headers, looked up by name (for a route's header matches)."""
        return RequestHeaders(self.raw)

    @property
    def peer(self) -> bytes:
        """The client's address, for X-Forwarded-For."""
        return self.conn.peer

    def continue_if_expected(self) -> None:
        """Answer ``Expect: 100-continue`` before the body is waited for: once, and only
        while the body has not begun (a client that sent it anyway needs no answer)."""
        body = self.body
        if self.expect_continue and body is not None and not body.eof and not body.received:
            self.expect_continue = False
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
