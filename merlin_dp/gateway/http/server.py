"""aiohttp's low-level server, with the gateway's JSON errors for bad requests.

We use ``aiohttp.web.Server`` (no Application, router or middleware on the hot path).
aiohttp answers requests it can't parse itself, in plain text; this module swaps in a
request handler whose ``handle_error`` answers with the gateway's JSON error body and
the status that fits (400 malformed, 414 request line too long, 431 header too large,
500 for a bug, without the trace).

Bodies are never decompressed (aiohttp's ``auto_decompress`` is off): the gateway
forwards the bytes it received under their own ``Content-Encoding`` and
``Content-Length``, and its body limit counts bytes on the wire. Inflating them would
send the replica a body its headers don't describe, and let a small compressed body
grow past any limit inside the gateway.

It also guards against abusive clients aiohttp leaves alone:

- a request head must arrive whole within ``header_timeout`` of its first byte, else
  408 and close (slowloris: aiohttp only bounds a connection that sends nothing). That
  holds for every head on a connection: the first (even when it comes with the
  connection, before aiohttp's handler task runs), each later one on a keep-alive
  connection, and one pipelined behind requests still being answered (its 408 follows
  their answers);
- a request asking to ``Upgrade`` (h2c, say) is served as a plain request: the gateway
  switches to no other protocol, and the requests pipelined behind it are answered
  (aiohttp's parser drops the rest of the read after such a request; when where that
  rest began can't be told, the answer closes the connection instead of leaving them
  unanswered);
- at most ``max_connections`` open connections per worker: past it a new connection is
  answered 503 and closed at once, so idle sockets can't exhaust memory or descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler

from merlin_dp.common.web import JsonErrorHandler
from merlin_dp.gateway.errors import error_body, error_response
from merlin_dp.gateway.metrics import ConnectionStats

log = logging.getLogger("gateway")


HEAD_END = b"\r\n\r\n"


class JsonErrorRequestHandler(JsonErrorHandler):
    """aiohttp's connection handler with the gateway's JSON errors, a clock on every
    request head, and upgrades declined.

    The head clock is decided after each read from what aiohttp's parser made of it, with
    no timer on the common reads: one that completes a head and, if any, its body, and
    ends there (a read ending in CRLFCRLF, or holding exactly one whole request), and one
    that only carries body bytes. Otherwise:

    - a read that completes no head and feeds no body holds head bytes: the clock starts
      (unless it runs already);
    - a read that completes heads stops their clock; if bytes may follow the last
      request, it starts again, *unsure*: the read may end exactly where that request
      ends, which the parser doesn't say. The next head bytes restart an unsure clock,
      so a head begun later still gets its full time (a pipelining client may get up to
      twice it);
    - when the clock runs out, the parser says whether a head is really under way
      (``feed_eof`` builds a message from a started head and is a no-op when none
      started): only then 408 and close, after the answers to earlier requests.
    """

    __slots__ = ("_body", "_clock_count", "_head_sure", "_head_timer", "_header_timeout")
    error_log = log

    def json_error(self, status: int, text: str | None) -> web.StreamResponse:
        return error_response(status, text or "internal gateway error", close=True)

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_sure = False
        self._clock_count = 0  # requests parsed when the clock started
        # The body still arriving, if any: bytes that go to it are not a head's.
        self._body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager: Any = self._manager
        super().connection_made(transport)
        if len(manager._connections) > manager.max_connections:
            manager.stats.refused += 1
            if self.transport is not None:
                self.transport.write(REFUSED)
            self.force_close()

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        body = self._body
        timer = self._head_timer
        received = 0 if body is None else body.total_bytes
        _aiohttp_data_received(self, data)
        if self._request_count == count:
            if body is not None:
                if body.is_eof():
                    self._body = None
                    # A Content-Length body took this many bytes of the read (a chunked
                    # one took more than its data: unsure then).
                    if not data.endswith(HEAD_END) and body.total_bytes - received < len(data):
                        self._start_head_clock(sure=False)
            elif data and (timer is None or not self._head_sure):
                if timer is not None:
                    timer.cancel()
                # Empty lines before a request line are allowed, and start no head.
                self._start_head_clock(sure=bool(data.strip(b"\r\n")))
            return
        # Heads were completed: their clock stops.
        if timer is not None:
            timer.cancel()
            self._head_timer = None
        if body is not None:
            self._body = None
        last: tuple[Any, StreamReader] = self._messages[-1]
        message, payload = last
        try:
            upgrade = message.upgrade
        except AttributeError:
            return  # unparsable: answered 400, then closed
        if upgrade and not self._upgraded:
            idle = body is None and timer is None
            self._upgrade_declined(data, message, payload, self._request_count - count, idle)
            return
        if payload is EMPTY_PAYLOAD:
            if data.endswith(HEAD_END):
                return  # bytes after a message can't end so without making another
        elif not payload.is_eof():
            self._body = payload  # what follows in later reads is its body
            return
        elif (
            # A read from a message's start (nothing was pending; aiohttp reads nothing
            # while its parser holds bytes back) that ends where its one request does: the
            # first head's end plus the last body is its length. Empty lines before the
            # request, or more requests, only make the sum fall short.
            body is None
            and timer is None
            and data.find(HEAD_END) + 4 + payload.total_bytes == len(data)
        ) or data.endswith(HEAD_END):
            return
        # The read may end exactly at the last message's end, or hold another's start.
        self._start_head_clock(sure=False)

    def _upgrade_declined(
        self,
        data: bytes,
        message: RawRequestMessage,
        payload: StreamReader,
        messages: int,
        idle: bool,
    ) -> None:
        """llhttp stops after a request asking to Upgrade (to h2c, say) and aiohttp,
        switching to no protocol, drops the rest of the read: find that rest (from a
        message's start, httptools stops at the same request) and parse it here."""
        rest = None
        if payload is not EMPTY_PAYLOAD and not payload.is_eof():
            # The rest is dropped after the body, in a later read, out of our sight.
            self._body = payload
        else:
            self._body = None
            # With aiohttp's queue full, its parser holds the rest back, to drop it when
            # it resumes (this also bounds how deep declined upgrades nest).
            if idle and len(self._messages) < self._max_msg_queue_size:
                rest = _after_upgrade(data, message, payload, messages)
        if rest is None:
            # Can't tell where the dropped bytes began: answer, then close, so that the
            # client knows at once the requests behind this one were not read.
            self._messages[-1] = (message._replace(should_close=True), payload)
        elif rest:
            self.data_received(rest)

    def _start_head_clock(self, sure: bool) -> None:
        self._head_sure = sure
        self._clock_count = self._request_count
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close or self._close:
            return
        waiter = self._waiter
        if waiter is None or waiter.done() or self._messages:
            # Earlier requests are still being answered, and answers go in order: look
            # again shortly (rare: a head pipelined behind a slow answer).
            self._head_timer = self._loop.call_later(
                min(1.0, self._header_timeout), self._head_late
            )
            return
        if self._request_count != self._clock_count:
            # The head this clock was for was completed out of our sight (aiohttp parses
            # what arrived behind a declined websocket upgrade in finish_response, not in
            # data_received): a head now under way gets a clock of its own, unsure.
            self._start_head_clock(sure=False)
            return
        if not self._head_under_way():
            return  # the read that started the clock ended at a message's end after all
        manager: Any = self._manager
        manager.stats.head_timeouts += 1
        self.transport.write(HEAD_TIMEOUT)
        self.force_close()

    def _head_under_way(self) -> bool:
        """Whether the parser holds part of a request head. Only asked before closing:
        when it does, aiohttp's parser makes a message of it (or fails to)."""
        parser: Any = self._parser
        if parser is None:
            return False
        try:
            return parser.feed_eof() is not None
        except PayloadEncodingError:
            return False  # a body short of its length: not a head
        except Exception:
            return True  # what arrived of the head doesn't make a request yet

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


_aiohttp_data_received = RequestHandler.data_received


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A whole error response as bytes, for where no request object exists."""
    body = error_body(status, message)
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _after_upgrade(
    data: bytes, message: RawRequestMessage, payload: StreamReader, messages: int
) -> bytes | None:
    """The bytes of ``data`` after the request that asked to Upgrade, the last of the
    ``messages`` aiohttp's parser made of it, or None when that can't be told. ``data``
    starts at a message's start. httptools stops at the same request, after as many
    (at its head's end); the body aiohttp read is added when its length on the wire is
    known."""
    begun = _Begun()
    try:
        httptools.HttpRequestParser(begun).feed_data(data)
    except httptools.HttpParserUpgrade as upgrade:
        end: int = upgrade.args[0]
    except httptools.HttpParserError:
        return None
    else:
        return None
    if begun.count != messages or message.chunked:
        return None
    return data[end + payload.total_bytes :]


class _Begun:
    """httptools callbacks counting the messages begun (it calls only those present)."""

    def __init__(self) -> None:
        self.count = 0

    def on_message_begin(self) -> None:
        self.count += 1


HEAD_TIMEOUT = _raw_error(408, "Request Timeout", "the request head did not arrive in time")
REFUSED = _raw_error(503, "Service Unavailable", "too many open connections to this gateway")


class GatewayHttpServer(web.Server):
    """``web.Server`` whose connections answer bad requests with JSON errors and are
    guarded against slow heads and connection floods."""

    def __init__(
        self,
        *args: Any,
        stats: ConnectionStats,
        header_timeout: float = 10.0,
        max_connections: int = 10_000,
        **kwargs: Any,
    ) -> None:
        kwargs["auto_decompress"] = False
        super().__init__(*args, **kwargs)
        self.stats = stats
        self.header_timeout = header_timeout
        self.max_connections = max_connections

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.stats.open += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        # Counted, not read from _connections: aiohttp forgets a connection only when its
        # handler task ends, after this call, and nothing updated the gauge then.
        self.stats.open -= 1

    def __call__(self) -> RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return JsonErrorRequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **kwargs
        )
