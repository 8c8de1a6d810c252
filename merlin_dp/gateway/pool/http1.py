"""The HTTP/1.1 connection pool: keep-alive connections to replicas, and the lean client.

:class:`Http1Pool` is the worker's pool for the HTTP front: idle connections kept per
replica (:class:`~merlin_dp.gateway.pool.upstream.Upstream`) for reuse, the clock of
the exchanges in flight on them, and the expiry of connections idle too long. A replica
that drains loses its idle connections at once, and the busy ones close when they end.

:class:`UpstreamConnection` is the lean client: an asyncio protocol with an httptools
response parser. It never creates a task; the request handler awaits a single future
per state change, and timeouts are the pool's ticker, not ``wait_for``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import cast

import httptools

from merlin_dp.gateway.pool.upstream import (
    ClientSideError,
    PoolLimits,
    Upstream,
    UpstreamError,
    UpstreamStats,
    connect_to,
)

# Response body bytes buffered from an upstream before we stop reading from it; the
# client side drains it. This bounds the gateway's memory per streamed response.
READ_HIGH_WATER = 256 * 1024

# What the gateway does with a response header, by its name: relay it as it came (0),
# or one of these. Looked up as spelled first (the usual spellings are there), then
# lowercased. Hop-by-hop fields (RFC 9110 §7.6.1) and those we set ourselves are dropped.
KEPT, LENGTH, CODING, CONNECTION, DROPPED = range(5)
_DROPPED = (b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
            b"x-model-version", b"x-request-id")  # fmt: skip
_USUAL = (b"Server", b"Date", b"Content-Type", b"server", b"date", b"content-type")
_KINDS_LOWER = {
    b"content-length": LENGTH,
    b"transfer-encoding": CODING,
    b"connection": CONNECTION,
    **dict.fromkeys(_DROPPED, DROPPED),
}
_KINDS = {
    **_KINDS_LOWER,
    **{name.title(): kind for name, kind in _KINDS_LOWER.items()},
    **dict.fromkeys(_USUAL, KEPT),
}


class Http1Pool:
    """The worker's HTTP/1.1 connections to replicas.

    Idle connections are kept per replica, newest last, so the ones idle longest are
    first to expire. Exchanges in flight register in ``busy`` with a deadline, and one
    ticker (every ``TICK`` seconds) times out the late ones and closes pooled connections
    idle too long: a timer per request would cost more than the rest of the bookkeeping
    together.
    """

    __slots__ = ("_ticker", "_ticks", "busy", "idle", "limits", "loop", "stats")

    TICK = 0.05

    def __init__(
        self, loop: asyncio.AbstractEventLoop, limits: PoolLimits, stats: UpstreamStats
    ) -> None:
        self.loop = loop
        self.limits = limits
        self.stats = stats
        self.idle: dict[Upstream, list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()  # exchanges on the clock
        self._ticks = 0
        self._ticker: asyncio.TimerHandle | None = loop.call_later(self.TICK, self._tick)

    def take_idle(self, up: Upstream) -> UpstreamConnection | None:
        idle = self.idle.get(up)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    async def connect(self, up: Upstream) -> UpstreamConnection:
        idle = self.idle.get(up)
        if idle is None:
            idle = self.idle[up] = []
        return await connect_to(
            up, lambda: UpstreamConnection(self, up, idle), self.limits.connect_timeout
        )

    def release(self, conn: UpstreamConnection) -> None:
        """Return a finished connection to its replica's idle list, or close it."""
        idle = conn.idle_list
        if conn.reusable() and not conn.upstream.draining and len(idle) < self.limits.max_idle:
            conn.idle_since = self.loop.time()
            idle.append(conn)
        else:
            conn.close()

    def drop(self, up: Upstream) -> None:
        """Close the idle connections to a replica that drains (a registry drain listener)."""
        idle = self.idle.pop(up, None)
        if idle:
            for conn in idle:
                conn.close()

    def _tick(self) -> None:
        now = self.loop.time()
        # A paused reader is waiting on a slow client, not on the replica.
        late = [c for c in self.busy if c.deadline <= now and not c.read_paused]
        for conn in late:
            self.busy.discard(conn)
            conn.time_out()
        self._ticks += 1
        if self._ticks % 20 == 0:
            self._close_idle_since(now - self.limits.idle_seconds)
        self._ticker = self.loop.call_later(self.TICK, self._tick)

    def _close_idle_since(self, cutoff: float) -> None:
        """Close pooled connections idle since before ``cutoff`` (oldest are first)."""
        for up, idle in list(self.idle.items()):
            if up.draining:
                # Made by a connect that began before the replica drained: its connections
                # close as they come back, and the entry goes here.
                self.drop(up)
                continue
            stale = 0
            while stale < len(idle) and idle[stale].idle_since < cutoff:
                idle[stale].close()
                stale += 1
            if stale:
                del idle[:stale]

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for up in list(self.idle):
            self.drop(up)


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a replica, carrying one exchange at a time."""

    __slots__ = (
        "awaiting_client",
        "body_sent",
        "buffered",
        "chunks",
        "closed",
        "coding",
        "complete",
        "connection",
        "deadline",
        "error",
        "exchange",
        "got_bytes",
        "head_done",
        "head_room",
        "header_count",
        "idle_list",
        "idle_since",
        "in_read",
        "keep_alive",
        "kept",
        "length",
        "listener",
        "loop",
        "no_body",
        "parser",
        "pool",
        "read_paused",
        "status",
        "timeout",
        "transport",
        "until_close",
        "upstream",
        "used",
        "waiter",
        "woken",
        "write_paused",
        "write_waiter",
    )

    def __init__(
        self, pool: Http1Pool, upstream: Upstream, idle_list: list[UpstreamConnection]
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.idle_list = idle_list  # where it waits between exchanges (see Http1Pool)
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False
        self.idle_since = 0.0
        self.deadline = 0.0
        self.timeout = 0.0
        self.exchange = 0  # exchanges begun on this connection; identifies the current one
        self.write_paused = False
        self.write_waiter: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        # A callback-driven user (a mirrored copy, an exchange sent at once) is called
        # instead of awaiting a future: once per read that changed the state (so that it
        # sees a head and the body that came with it together), else at once.
        self.listener: Callable[[], None] | None = None
        self.in_read = False
        self.woken = False
        self.read_paused = False
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self._reset_head()
        self.keep_alive = False
        self.head_done = False
        self.head_room = self.pool.limits.max_head_bytes  # response head bytes still allowed
        self.complete = False
        self.got_bytes = False
        self.no_body = False
        self.until_close = False
        self.body_sent = True
        self.awaiting_client = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.error: UpstreamError | None = None

    def _reset_head(self) -> None:
        # The response head, sorted as it arrives: the lines relayed as they came
        # (``Name: value``, no CRLF), and what the gateway acts on.
        self.kept: list[bytes] = []
        self.header_count = 0
        self.length = False  # a Content-Length among the kept lines
        self.coding: bytes | None = None  # Transfer-Encoding
        self.connection: bytes | None = None  # Connection, its lines joined

    # --- pool bookkeeping ---------------------------------------------------------

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.body_sent
            and self.error is None
            and not self.no_body
            and self.usable()
        )

    @property
    def reused(self) -> bool:
        return self.exchange > 1

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def time_out(self) -> None:
        if self.complete:
            return  # the answer is whole: what's late is a slow client, not the replica
        if self.awaiting_client:
            self.fail(ClientSideError(408, f"the client sent no body for {self.timeout:g} s"))
        else:
            self.fail(UpstreamError("timeout", f"the replica was silent for {self.timeout:g} s"))

    # --- one exchange -------------------------------------------------------------

    def begin(self, data: bytes, no_body: bool, timeout: float, body_sent: bool = True) -> None:
        """Start an exchange by writing the request head (and body, if buffered).

        The exchange must end with :meth:`finish`, which takes it off the clock.
        """
        if self.used:
            self._reset_exchange()
        self.used = True
        self.exchange += 1
        self.no_body = no_body
        self.body_sent = body_sent
        self.timeout = timeout
        self.deadline = self.loop.time() + timeout
        self.pool.busy.add(self)
        if self.closed:
            # Closed by the replica after we took it: nothing was sent, fail fast.
            self.error = UpstreamError("reset", "the replica closed the connection", unread=True)
            self._wake()
            return
        assert self.transport is not None
        self.transport.write(data)

    def finish(self) -> None:
        self.pool.busy.discard(self)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.deadline = self.loop.time() + self.timeout
        self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused and self.error is None:
            waiter = self.loop.create_future()
            self.write_waiter = waiter
            await waiter

    async def wait(self) -> None:
        """Wait for the next state change: head, body bytes, completion or error."""
        waiter = self.loop.create_future()
        self.waiter = waiter
        await waiter

    def take_chunks(self) -> list[bytes]:
        chunks = self.chunks
        self.chunks = []
        self.buffered = 0
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.deadline = self.loop.time() + self.timeout
            self.transport.resume_reading()
        return chunks

    def fail(self, error: UpstreamError) -> None:
        if self.complete:
            # The answer is whole and stands; whatever went wrong after it (bytes past its
            # end, an upload cut short) leaves the connection unfit for another exchange.
            self._desync()
            return
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        listener = self.listener
        if listener is not None:
            if self.in_read:
                self.woken = True
            else:
                listener()
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pool.stats.connects += 1

    def data_received(self, data: bytes) -> None:
        if self.complete or not self.used:
            self._desync()
            return
        self.got_bytes = True
        # The timeout bounds silence, not the whole exchange, so streams may run long.
        self.deadline = self.loop.time() + self.timeout
        self.in_read = True
        try:
            if self.head_done or len(data) <= self.head_room:
                if not self.head_done:
                    self.head_room -= len(data)
                self.parser.feed_data(data)
            else:
                self._parse(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError("protocol", "upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError("protocol", f"malformed response from upstream: {exc}"))
        finally:
            self.in_read = False
            if self.woken:
                self.woken = False
                listener = self.listener
                if listener is not None:
                    listener()

    def _parse(self, data: bytes) -> None:
        # A head going past its limit. Its bytes are counted before the parser sees them:
        # httptools keeps an unfinished header in memory, so a cap checked in its
        # callbacks would come after the damage.
        room = self.head_room
        self.head_room = room - len(data)
        self._feed_within_head_limit(memoryview(data), room)

    def _feed_within_head_limit(self, data: memoryview, room: int) -> None:
        # The parser gets what the head may still take; the rest only if the head ended
        # within it (then it is body). Slices of a view: nothing copied.
        self.parser.feed_data(data[:room])
        if not self.head_done:
            limit = self.pool.limits.max_head_bytes
            self.fail(UpstreamError("protocol", f"response head over {limit} bytes"))
            return
        self.parser.feed_data(data[room:])

    def eof_received(self) -> bool | None:
        if (
            self.used
            and not (self.got_bytes or self.complete)
            and self.error is None
            and self._write_refused()
        ):
            # The replica's socket was gone when our request reached it (a FIN came
            # before we sent, and its kernel answered the request with RST): unread.
            self.error = UpstreamError(
                "reset", f"upstream {self.upstream.address} closed the connection", unread=True
            )
        return None  # close the transport; connection_lost reports it

    def _write_refused(self) -> bool:
        """Whether the replica's kernel reset what we wrote after it had closed: after
        its FIN the connection is half-closed, and a RST then leaves EPIPE pending on
        the socket. Asked only at an EOF mid-exchange, never per request."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock else 0
        except OSError:
            return False
        return err in (errno.EPIPE, errno.ECONNRESET)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.used and self.error is None:
            if exc is None and self.head_done and self.until_close:
                # A response delimited by connection close ends here.
                self.complete = True
            if not self.complete:
                reason = f": {exc}" if exc else ""
                self.error = UpstreamError(
                    "reset",
                    f"upstream {self.upstream.address} closed the connection{reason}",
                    unread=not self.got_bytes
                    and isinstance(exc, (ConnectionResetError, BrokenPipeError)),
                )
        ww = self.write_waiter
        if ww is not None and not ww.done():
            ww.set_result(None)
        self._wake()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        ww = self.write_waiter
        if ww is not None:
            self.write_waiter = None
            if not ww.done():
                ww.set_result(None)

    # --- httptools callbacks ------------------------------------------------------

    def _desync(self) -> None:
        # Bytes outside an exchange: the replica and we disagree on framing. Never reuse
        # such a connection (they could become another client's answer).
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a chunked body's trailer: not relayed
        self.header_count += 1
        kind = _KINDS.get(name)
        if kind is None:
            kind = _KINDS_LOWER.get(name.lower(), KEPT)
        if kind == KEPT:
            self.kept.append(name + b": " + value)
        elif kind == LENGTH:
            self.kept.append(name + b": " + value)
            self.length = True
        elif kind == CONNECTION:
            c = self.connection
            self.connection = value if c is None else c + b"," + value
        elif kind == CODING:
            c = self.coding
            self.coding = value if c is None else c + b"," + value

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer (or junk) right behind a whole one, in the same read: stop
            # the parser here; feed_data raises and fail() retires the connection.
            raise UpstreamError("protocol", "bytes after a complete answer")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 or status > 599:
            if 100 <= status < 200 and status != 101:
                # Interim response (100 Continue, 103 Early Hints): not forwarded.
                self._reset_head()
                return
            # 101 would hand us another protocol; outside 100-599 is no HTTP status.
            self.fail(UpstreamError("protocol", f"the replica answered status {status}"))
            return
        if self.header_count > self.pool.limits.max_headers:
            limit = self.pool.limits.max_headers
            self.fail(UpstreamError("protocol", f"response head with over {limit} headers"))
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if not self.keep_alive:
            # RFC 9112 §6.3: no length and no final "chunked" coding: the body ends at close.
            coding = self.coding
            self.until_close = not self.length and not (
                coding is not None and coding.lower().rstrip().endswith(b"chunked")
            )
        if not self.body_sent:
            # Answered while the upload still streams: the replica may never read the rest,
            # so bytes of this body could stand where it expects the next request's head.
            # Even if the rest is sent by the time the answer ends, the connection is spent.
            self.keep_alive = False
        if self.no_body:
            # A HEAD response: httptools can't be told to expect no body, so the exchange
            # ends at the head and the connection is not reused.
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.no_body or self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.read_paused and self.transport:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status:
            self.complete = True
            self._wake()
