"""One client connection of the HTTP/1.1 front: parsing, order, flow control, limits.

:class:`HttpConnection` is an asyncio protocol with an httptools (llhttp) request parser
in its strict mode. It owns what a connection must get right whatever the request:

- **Strict framing.** llhttp refuses the request-smuggling shapes (Content-Length with
  Transfer-Encoding, two Content-Lengths, a bad chunk size, obs-fold, a bare LF, a
  Transfer-Encoding whose last coding is not chunked); this module adds a second Host, a
  missing one on HTTP/1.1, and a version other than 1.0 and 1.1. Each gets its JSON
  error (400, 414, 431 or 505) after the answers to the requests before it, and the
  connection closes: nothing after a framing error is read, so nothing ambiguous
  reaches a replica.
- **Limits on the wire.** A request line over ``max_line_bytes`` (414), a header line
  over ``max_header_bytes``, more than ``max_headers`` lines or a head over
  ``head_limit`` bytes (431). Head bytes are counted before the parser sees them, so a
  head that never ends can't grow a buffer.
- **Order.** Requests are answered one at a time, in order; pipelined ones wait parsed
  (at most ``MAX_PIPELINED``; past that the connection stops reading).
- **Flow control.** Reading stops while a request body has more than
  :data:`~merlin_dp.gateway.http.request.BODY_HIGH_WATER` bytes waiting for the replica,
  and answers wait while the client doesn't read (``drain``).
- **Time.** A head must be whole ``header_timeout`` after its first byte (408 otherwise:
  slowloris), an idle connection closes after ``keepalive``; both are checked by the
  front's ticker, not by a timer per request.
- **Upgrades declined.** A request asking to Upgrade (h2c, websocket) is served as a plain
  request and the connection goes on; its Content-Length body is taken past the parser,
  which stops at an upgrade.

The proxy gets each request when its head is parsed (:meth:`HttpFront.handler`), body
still arriving or not, and writes its answer with :meth:`write`. A client that leaves
cancels the request's handler.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import httptools

from merlin_dp.gateway.errors import ClientGone
from merlin_dp.gateway.http.request import BadBody, HttpRequest, RequestBody
from merlin_dp.gateway.http.responses import (
    BAD_HOST,
    HEAD_TIMEOUT,
    INTERNAL_ERROR,
    REFUSED,
    malformed,
)
from merlin_dp.gateway.http.settings import FrontSettings
from merlin_dp.gateway.metrics import ConnectionStats

log = logging.getLogger("gateway")

# Parsed requests waiting behind the one being answered before we stop reading.
MAX_PIPELINED = 16
HEAD_END = b"\r\n\r\n"
# What the gateway does with a request header, by its name: nothing (0), or note it as
# one of these. Looked up as spelled first (the usual spellings, and common headers that
# need nothing, are there), lowercased only for other spellings.
_HOST, _LENGTH, _CODING, _EXPECT, _REQUEST_ID, _CONNECTION, _HOP = range(1, 8)
_KINDS_LOWER = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"expect": _EXPECT,
    b"x-request-id": _REQUEST_ID,
    b"connection": _CONNECTION,
    # Hop-by-hop (RFC 9110 §7.6.1), and X-Forwarded-For, which we extend: the forwarded
    # head is then made line by line (see Proxy._request_head).
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"trailer": _HOP,
    b"upgrade": _HOP,
    b"x-forwarded-for": _HOP,
}
_PLAIN = (b"content-type", b"user-agent", b"accept", b"accept-encoding", b"accept-language",
          b"authorization", b"cookie", b"content-encoding", b"cache-control", b"origin",
          b"referer", b"x-model-version")  # fmt: skip
_KINDS: dict[bytes, int] = {
    **_KINDS_LOWER,
    **{name.title(): kind for name, kind in _KINDS_LOWER.items()},
    b"X-Request-ID": _REQUEST_ID,
    b"TE": _HOP,
    **{name: 0 for name in _PLAIN},
    **{name.title(): 0 for name in _PLAIN},
}
_METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
}


# The proxy: answers a request at once or by callbacks (None), or with a coroutine.
Handler = Callable[[HttpRequest], Coroutine[Any, Any, None] | None]


class Front(Protocol):
    """What connections share: the listener (:class:`~merlin_dp.gateway.http.front.
    HttpFront`) that made them."""

    loop: asyncio.AbstractEventLoop
    handler: Handler
    settings: FrontSettings
    stats: ConnectionStats
    connections: set[HttpConnection]
    heads: set[HttpConnection]
    closing: bool
    line_too_long: bytes
    head_too_large: bytes

    def bad_version(self, version: str) -> bytes: ...
    def connection_closed(self) -> None: ...


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing: the answer is ``data``."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data


class HttpConnection(asyncio.Protocol):
    """One client connection: its parser, its requests in order, its flow control."""

    __slots__ = (
        "_active",
        "_body_paused",
        "_closing",
        "_drain_waiter",
        "_final",
        "_head_carried",
        "_head_charge",
        "_hosts",
        "_in_head",
        "_lingering",
        "_max_field",
        "_max_headers",
        "_max_line",
        "_parsing",
        "_queue_paused",
        "_raw_body_left",
        "_ready",
        "_starting",
        "_task",
        "_url",
        "front",
        "head_since",
        "idle_since",
        "loop",
        "parser",
        "peer",
        "transport",
        "write_paused",
    )

    def __init__(self, front: Front) -> None:
        self.front = front
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.peer = b"unknown"
        self.parser = httptools.HttpRequestParser(self)
        settings = front.settings
        self._max_line = settings.max_line_bytes
        self._max_field = settings.max_header_bytes
        self._max_headers = settings.max_headers
        self._parsing: HttpRequest | None = None  # the request whose bytes are arriving
        self._url = b""
        self._hosts = 0
        self._in_head = False
        self._head_carried = False  # the head under way began in an earlier read
        self._head_charge = 0  # its bytes so far, counted against head_limit
        self.head_since = 0.0  # when a head left unfinished by a read began (its clock)
        self.idle_since = 0.0  # when the connection last fell idle; 0 while not idle
        self._ready: deque[HttpRequest] = deque()  # parsed, waiting their turn
        self._active: HttpRequest | None = None  # being answered
        self._task: asyncio.Task[None] | None = None
        self._starting = False
        self._final: bytes | None = None  # answered after the others, then close
        self._closing = False  # close once the request being answered is
        self._lingering = False  # answered early: the rest of the upload is dropped
        self._raw_body_left = 0  # an Upgrade request's body still to take past the parser
        self._body_paused = False
        self._queue_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        front = self.front
        front.stats.open += 1
        if len(front.connections) >= front.settings.max_connections:
            front.stats.refused += 1
            self.transport.write(REFUSED)
            self.transport.close()
            return
        front.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0]).encode()
        self.idle_since = self.loop.time()
        if front.closing:
            self._closing = True

    def data_received(self, data: bytes) -> None:
        if self._lingering or self._final is not None:
            return  # after an early answer or a refused request nothing more is read
        if self._raw_body_left:
            data = self._take_raw_body(data)
            if not data:
                return
        if self._head_carried:
            room = self.front.settings.head_limit - self._head_charge
            if len(data) > room:
                self._feed_within_head_limit(data, room)
                self._after_read()
                return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_stopped(data, exc)
            self._after_read()
            return
        if self._in_head:
            self._head_unfinished(data)
        if self._active is None and self._ready:
            self._run()

    def _after_read(self) -> None:
        if self._active is None and (self._ready or self._final is not None):
            self._run()

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; False when parsing stopped (a refused request, an upgrade)."""
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_stopped(data, exc)
            return False
        return True

    def _parse_stopped(
        self, data: bytes | memoryview, exc: httptools.HttpParserError | httptools.HttpParserUpgrade
    ) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._upgrade(data, exc.args[0])
        elif isinstance(exc, httptools.HttpParserCallbackError):
            cause = exc.__context__
            if isinstance(cause, _HeadRefused):
                self._refuse(cause.data)
            else:
                log.error("request parser callback failed", exc_info=cause)
                self._refuse(INTERNAL_ERROR)
        elif isinstance(exc, httptools.HttpParserError):
            self._refuse(malformed(exc))

    def _head_unfinished(self, data: bytes) -> None:
        """A read ended inside a head: count its bytes so far and start its clock."""
        if self._head_carried:
            self._head_charge += len(data)
        else:
            # The head began in this read, after the last head's end at the latest (a
            # head can't hold CRLFCRLF): at most this many of its bytes are here.
            end = data.rfind(HEAD_END)
            self._head_charge = len(data) - (end + 4 if end >= 0 else 0)
            self._head_carried = True
        if self._head_charge > self.front.settings.head_limit:
            self._refuse(self.front.head_too_large)
            return
        if not self.head_since:
            self.head_since = self.loop.time()
            self.front.heads.add(self)

    def _feed_within_head_limit(self, data: bytes, room: int) -> None:
        # The parser gets what the head may still take; the rest only if the head ended
        # within it. Slices of a view: nothing copied.
        view = memoryview(data)
        if not self._feed(view[: max(room, 0)]):
            return
        if self._head_carried:
            self._refuse(self.front.head_too_large)
            return
        self.data_received(bytes(view[room:]))

    def eof_received(self) -> bool | None:
        # The client closed its side: taken as leaving (as nginx does), so a request under
        # way stops rather than keeping a replica busy for nobody.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        front = self.front
        front.stats.open -= 1
        front.connections.discard(self)
        if self.head_since:
            front.heads.discard(self)
        self.transport = None
        gone = ClientGone("the client closed the connection")
        parsing = self._parsing
        if parsing is not None and parsing.body is not None:
            parsing.body.fail(gone)
        for request in self._ready:
            if request.body is not None:
                request.body.fail(gone)
        self._ready.clear()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(gone)
        self._drain_waiter = None
        active = self._active
        if active is not None:
            task = self._task
            if task is not None:
                task.cancel()
            elif active.on_gone is not None:
                active.on_gone()
        front.connection_closed()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._active is None and (self._ready or self._final is not None):
            self._run()

    # --- parser callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._hosts = 0
        self.idle_since = 0.0
        self._parsing = HttpRequest(self)

    def on_url(self, url: bytes) -> None:
        url = self._url + url
        self._url = url
        if len(url) > self._max_line:
            raise _HeadRefused(self.front.line_too_long)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: not forwarded (nginx drops them too)
        request = self._parsing
        assert request is not None
        if value and value[-1] <= 32:
            # llhttp keeps whitespace after a value; it is not part of it (RFC 9110 §5.5).
            value = value.rstrip(b" \t")
        if len(value) > self._max_field:
            raise _HeadRefused(self.front.head_too_large)
        request.raw.append((name, value))
        kind = _KINDS.get(name)
        if kind is None:
            kind = _KINDS_LOWER.get(name.lower(), 0)
        if kind:
            self._note(request, kind, value)

    def _note(self, request: HttpRequest, kind: int, value: bytes) -> None:
        if kind == _HOST:
            self._hosts += 1
            request.host = value.decode("latin-1")
        elif kind == _LENGTH:
            request.content_length = int(value)  # llhttp let only digits through
        elif kind == _CODING:
            request.chunked = request.hop = True
            te = request.transfer_encoding
            request.transfer_encoding = value if te is None else te + b", " + value
        elif kind == _EXPECT:
            request.hop = True
            request.expect_continue = value.lower() == b"100-continue"
        elif kind == _REQUEST_ID:
            if request.request_id is None:
                request.request_id = value
        elif kind == _CONNECTION:
            request.hop = True
            c = request.connection
            request.connection = value if c is None else c + b"," + value
        else:
            request.hop = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_carried:
            self._head_carried = False
            if self.head_since:
                self.head_since = 0.0
                self.front.heads.discard(self)
        parser = self.parser
        request = self._parsing
        assert request is not None
        if len(request.raw) > self._max_headers:
            raise _HeadRefused(self.front.head_too_large)
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                raise _HeadRefused(self.front.bad_version(version))
            request.http10 = True
        if self._hosts != 1 and (self._hosts or not request.http10):
            raise _HeadRefused(BAD_HOST)
        method = parser.get_method()
        request.method = _METHODS.get(method) or method.decode("latin-1")
        request.target = self._url.decode("latin-1")
        request.keep_alive = parser.should_keep_alive()
        if request.chunked or request.content_length:
            request.body = RequestBody(self)
        ready = self._ready
        ready.append(request)
        if len(ready) > MAX_PIPELINED and not self._queue_paused:
            self._queue_paused = True
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if request is not None:
            received = request.body
            if received is not None:
                received.feed(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if request is not None:
            self._parsing = None
            received = request.body
            if received is not None:
                received.eof = True
                if received.waiting:
                    received.end()

    # --- declined upgrades ------------------------------------------------------------

    def _upgrade(self, data: bytes | memoryview, offset: int) -> None:
        """llhttp stops after a request asking to Upgrade (or a CONNECT), at the end of
        its head. We switch to no protocol: the request is served as a plain one, its
        body (by Content-Length) taken past the parser, and a fresh parser reads on."""
        request = self._ready[-1] if self._ready else None
        self.parser = httptools.HttpRequestParser(self)
        self._parsing = None
        if request is None or request.method == "CONNECT":
            self._closing = True  # a tunnel's bytes follow, not requests: answer, close
            return
        if request.chunked:
            # Where a chunked body ends can't be told past the parser: serve what there
            # is, then close.
            request.keep_alive = False
            self._closing = True
            if request.body is not None:
                request.body.end()
            return
        rest = bytes(data[offset:])
        if request.body is not None:
            # llhttp ended the message at the head: the body is ours to take.
            request.body.eof = False
            self._raw_body_left = request.content_length or 0
            self._parsing = request
            rest = self._take_raw_body(rest)
        if rest:
            self.data_received(rest)

    def _take_raw_body(self, data: bytes) -> bytes:
        """Body bytes of a declined upgrade, taken past the parser; what follows."""
        size = self._raw_body_left
        request = self._parsing
        assert request is not None and request.body is not None
        taken = data[:size]
        self._raw_body_left = size - len(taken)
        request.body.feed(taken)
        if self._raw_body_left:
            return b""
        self._parsing = None
        request.body.end()
        return data[size:]

    # --- refusals -------------------------------------------------------------------

    def _refuse(self, answer: bytes) -> None:
        """The bytes can't be read further: answer ``answer`` after the requests before
        it, then close. A request whose body the bad bytes were part of is answered by
        the proxy instead (its body fails with :class:`BadBody`)."""
        self._final = answer
        parsing = self._parsing
        self._parsing = None
        if parsing is not None and not self._in_head:
            body = parsing.body
            if body is not None and not body.eof:
                body.fail(BadBody(answer))
                self._final = b""
        self._in_head = False
        if self.head_since:
            self.head_since = 0.0
            self.front.heads.discard(self)
        if self.transport is not None:
            self.transport.pause_reading()

    def head_late(self) -> None:
        """The front's ticker: a head began ``header_timeout`` ago and isn't whole."""
        self.front.stats.head_timeouts += 1
        self._refuse(HEAD_TIMEOUT)
        if self._active is None:
            self._run()

    # --- answering in order -----------------------------------------------------------

    def _run(self) -> None:
        """Start the next requests, one at a time, while they are answered at once."""
        if self._starting:
            return
        handler = self.front.handler
        while self._active is None and self.transport is not None:
            if self.write_paused:
                return  # resume_writing comes back here
            ready = self._ready
            if not ready:
                if self._final is not None:
                    if self._final:
                        self.transport.write(self._final)
                    self._close()
                elif self._closing and not self._in_head:
                    self._close()
                elif not self._in_head:
                    self.idle_since = self.loop.time()
                return
            request = ready.popleft()
            if self._queue_paused and len(ready) <= MAX_PIPELINED // 2:
                self._queue_paused = False
                self._update_reading()
            self._active = request
            self._starting = True
            try:
                work = handler(request)
            except Exception:
                log.exception("unexpected error answering %s %s", request.method, request.target)
                work = None
                self.write(INTERNAL_ERROR)
                request.keep_alive = False
                self._active = None
                self._done(request)
            finally:
                self._starting = False
            if work is not None:
                self.follow(work)
                return
            if self._active is request:
                return  # answered later by a callback: answered() comes back here

    def follow(self, work: Coroutine[Any, Any, None]) -> None:
        """Answer the request under way with ``work``, run as a task (cancelled if the
        client leaves)."""
        task = self._task = self.loop.create_task(work)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        request = self._active
        if exc is not None:
            if not isinstance(exc, ConnectionError):
                log.error("unexpected error answering a request", exc_info=exc)
            self.abort()
            return
        if request is not None:
            self.answered(request)

    def answered(self, request: HttpRequest) -> None:
        """The answer to ``request`` is written: go on with the next, or close."""
        if self._active is not request:
            return
        self._active = None
        if self._done(request):
            self._run()

    def _done(self, request: HttpRequest) -> bool:
        """After an answer: whether the connection serves on."""
        if self.transport is None:
            return False
        body = request.body
        if body is not None and not body.eof and body.error is None:
            # Answered before its body arrived (413, say): the rest is not read. Stop
            # answering, let the answer reach the client, then close.
            self._linger()
            return False
        if not request.keep_alive or self._closing:
            self._close()
            return False
        return True

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _linger(self) -> None:
        """Close after an early answer without cutting it short: send our FIN, drop what
        the client still sends for a moment, then close (a close with unread bytes would
        send a reset, which can destroy the answer in flight)."""
        transport = self.transport
        if transport is None:
            return
        self._lingering = True
        self._ready.clear()
        if self._body_paused or self._queue_paused or self._final is not None:
            self._body_paused = self._queue_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(self.front.settings.linger_seconds, self._close)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shut_down(self) -> None:
        """The gateway stops: close now if idle, else after the answer under way."""
        self._closing = True
        active = self._active
        if active is None and not self._ready:
            self._close()
        elif active is not None:
            active.keep_alive = False  # said in the answer, if it isn't written yet

    # --- writing ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            raise ClientGone("the client closed the connection")
        transport.write(data)

    async def drain(self) -> None:
        """Wait while the client doesn't read what we wrote."""
        if self.write_paused and self.transport is not None:
            waiter = self._drain_waiter = self.loop.create_future()
            await waiter

    # --- reading flow control ---------------------------------------------------------

    def pause_for_body(self) -> None:
        if not self._body_paused:
            self._body_paused = True
            self._update_reading()

    def body_drained(self) -> None:
        if self._body_paused:
            self._body_paused = False
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self._final is not None or self._lingering:
            return
        if self._body_paused or self._queue_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()
