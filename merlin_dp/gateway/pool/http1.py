"""Replicas as the gateway sees them: keep-alive connection pools and health state.

Each :class:`Upstream` is one replica address. It owns a pool of idle HTTP/1.1
connections, the count of requests outstanding on it (for least-outstanding choice),
and its passive outlier-ejection state. Upstreams outlive route tables: the
:class:`UpstreamRegistry` hands the same object to every table that names the address,
so pools and counts carry across a table swap, and an address that leaves the table
drains (no new requests; its connections close once idle).

:class:`UpstreamConnection` is the lean client: an asyncio protocol with an httptools
response parser. It never creates a task; the request handler awaits a single future
per state change, and timeouts are loop timers, not ``wait_for``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar, cast

import httptools

from merlin_dp.common.aio import raise_if_cancelling

# Response body bytes buffered from an upstream before we stop reading from it; the
# client side drains it. This bounds the gateway's memory per streamed response.
READ_HIGH_WATER = 256 * 1024


class UpstreamError(Exception):
    """An exchange with a replica failed; ``kind`` names how, for metrics and retry.

    ``unread`` marks a reset that proves the replica never read the request: the kernel
    answers with RST, before any response byte, only when the replica's socket is gone
    or is closed with our bytes still unread (a replica that read the request and then
    died closes with FIN instead). Such a request is safe to send elsewhere.
    """

    def __init__(self, kind: str, message: str, unread: bool = False) -> None:
        super().__init__(message)
        self.kind = kind  # connect | reset | protocol | timeout
        self.unread = unread


class ClientSideError(UpstreamError):
    """The exchange failed because of the client (body too large, stalled, gone).

    The replica is not to blame: no ejection, no upstream error metric; ``status`` is
    what the client is told (413, 408, or 499 when it is gone).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__("client", message)
        self.status = status


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_idle: int = 64
    # Below the keep-alive timeout of common servers (uvicorn 5 s, aiohttp 75 s, nginx
    # 75 s): a pooled connection closed by the replica while idle is a request lost to
    # a race, so we let go of idle connections first.
    idle_seconds: float = 4.0
    connect_timeout: float = 3.0
    # Passive outlier ejection, in the spirit of Envoy's consecutive_5xx detector.
    eject_after: int = 5
    eject_base_seconds: float = 5.0
    eject_max_seconds: float = 120.0
    # A replica's response head (with any 1xx heads before it) is refused 502 past these,
    # and its connection dropped: without a bound, a replica streaming one endless header
    # grows the parser's buffer until the gateway runs out of memory. Envoy's defaults
    # (60 KiB, 100 headers) in round numbers; nginx's proxy_buffer_size (4-8 KiB) is
    # tighter than model servers' heads need.
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def connect_to(up: Upstream, protocol: Callable[[], _P], limit_s: float) -> _P:
    """A connection to the replica within ``limit_s``; UpstreamError("connect") if not.
    Shared by the HTTP upstream pool and the gRPC one."""
    try:
        async with asyncio.timeout(limit_s):
            _, conn = await asyncio.get_running_loop().create_connection(protocol, up.host, up.port)
    except TimeoutError:
        raise_if_cancelling()
        raise UpstreamError("connect", f"connect to {up.address} timed out") from None
    except OSError as exc:
        raise UpstreamError(
            "connect", f"connect to {up.address} failed: {exc.strerror or exc}"
        ) from None
    return conn


class Upstream:
    """One replica address: its connection pool, load and health."""

    __slots__ = (
        "address",
        "draining",
        "ejected",
        "ejections",
        "failures",
        "host",
        "idle",
        "limits",
        "loop",
        "outstanding",
        "port",
        "registry_busy",
        "stats",
    )

    def __init__(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        limits: PoolLimits,
        stats: UpstreamStats,
        busy: set[UpstreamConnection],
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.loop = loop
        self.limits = limits
        self.stats = stats
        self.registry_busy = busy  # exchanges on the clock (see UpstreamRegistry)
        self.idle: list[UpstreamConnection] = []
        self.outstanding = 0
        self.failures = 0  # consecutive connect errors, resets and 5xx
        self.ejected = False
        self.ejections = 0  # consecutive ejections, for the back-off
        self.draining = False

    def take_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        loop = self.loop
        return await connect_to(
            self, lambda: UpstreamConnection(self, loop), self.limits.connect_timeout
        )

    def release(self, conn: UpstreamConnection) -> None:
        """Return a finished connection to the pool, or close it."""
        if conn.reusable() and not self.draining and len(self.idle) < self.limits.max_idle:
            conn.idle_since = self.loop.time()
            self.idle.append(conn)
        else:
            conn.close()

    def close_idle_since(self, cutoff: float) -> None:
        """Close pooled connections idle since before ``cutoff`` (oldest are first)."""
        idle = self.idle
        stale = 0
        while stale < len(idle) and idle[stale].idle_since < cutoff:
            idle[stale].close()
            stale += 1
        if stale:
            del idle[:stale]

    def record_success(self) -> None:
        if self.failures:
            self.failures = 0
            self.ejections = 0  # the back-off counts consecutive ejections only

    def record_failure(self) -> None:
        self.failures += 1
        if not self.ejected and self.failures >= self.limits.eject_after:
            self._eject()

    def _eject(self) -> None:
        limits = self.limits
        self.ejected = True
        self.ejections += 1
        self.stats.ejections += 1
        seconds = min(limits.eject_base_seconds * self.ejections, limits.eject_max_seconds)
        self.loop.call_later(seconds, self._readmit)

    def _readmit(self) -> None:
        # Back in rotation on probation: one more failure streak ejects it for longer;
        # a success clears the streak and the back-off.
        self.ejected = False
        self.failures = self.limits.eject_after - 1 if self.ejections else 0

    def drain(self) -> None:
        """Leave rotation: no new requests, idle connections closed now."""
        self.draining = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class UpstreamStats:
    """Gateway-wide upstream counters, shared by every Upstream (one worker)."""

    __slots__ = ("connects", "ejections", "errors", "retries")

    def __init__(self) -> None:
        self.connects = 0
        self.ejections = 0
        self.retries = 0
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class UpstreamRegistry:
    """The one Upstream object per address, shared by every route table that names it.

    It also keeps the worker's clock for connections: exchanges in flight register in
    ``busy`` with a deadline, and one ticker (every ``TICK`` seconds) times out the late
    ones and closes pooled connections idle too long. A timer per request would cost
    more than the rest of the bookkeeping together.
    """

    TICK = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: PoolLimits) -> None:
        self._loop = loop
        self._limits = limits
        self._by_address: dict[tuple[str, int], Upstream] = {}
        self.stats = UpstreamStats()
        self.busy: set[UpstreamConnection] = set()
        self._ticks = 0
        self._ticker: asyncio.TimerHandle | None = loop.call_later(self.TICK, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        # A paused reader is waiting on a slow client, not on the replica.
        late = [c for c in self.busy if c.deadline <= now and not c.read_paused]
        for conn in late:
            self.busy.discard(conn)
            conn.time_out()
        self._ticks += 1
        if self._ticks % 20 == 0:
            cutoff = now - self._limits.idle_seconds
            for up in self._by_address.values():
                up.close_idle_since(cutoff)
        self._ticker = self._loop.call_later(self.TICK, self._tick)

    def get(self, host: str, port: int) -> Upstream:
        key = (host, port)
        up = self._by_address.get(key)
        if up is None or up.draining:
            up = Upstream(host, port, self._loop, self._limits, self.stats, self.busy)
            self._by_address[key] = up
        return up

    def retain(self, keep: Iterable[Upstream]) -> None:
        """Drain every upstream not in ``keep`` (called after a table swap)."""
        wanted = {id(u) for u in keep}
        for key, up in list(self._by_address.items()):
            if id(up) not in wanted:
                up.drain()
                del self._by_address[key]

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for up in self._by_address.values():
            up.drain()
        self._by_address.clear()


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a replica, carrying one exchange at a time."""

    __slots__ = (
        "awaiting_client",
        "body_sent",
        "buffered",
        "chunks",
        "closed",
        "complete",
        "deadline",
        "error",
        "exchange",
        "got_bytes",
        "head_done",
        "head_room",
        "headers",
        "idle_since",
        "keep_alive",
        "listener",
        "loop",
        "no_body",
        "parser",
        "read_paused",
        "status",
        "timeout",
        "transport",
        "until_close",
        "upstream",
        "used",
        "waiter",
        "write_paused",
        "write_waiter",
    )

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self.upstream = upstream
        self.loop = loop
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
        # A callback-driven user (a shadow copy) is called at every state change instead
        # of awaiting a future.
        self.listener: Callable[[], None] | None = None
        self.read_paused = False
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.head_done = False
        self.head_room = self.upstream.limits.max_head_bytes  # response head bytes still allowed
        self.complete = False
        self.got_bytes = False
        self.no_body = False
        self.until_close = False
        self.body_sent = True
        self.awaiting_client = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.error: UpstreamError | None = None

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
        self.upstream.registry_busy.add(self)
        if self.closed:
            # Closed by the replica after we took it: nothing was sent, fail fast.
            self.error = UpstreamError("reset", "the replica closed the connection", unread=True)
            self._wake()
            return
        assert self.transport is not None
        self.transport.write(data)

    def finish(self) -> None:
        self.upstream.registry_busy.discard(self)

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
        self.upstream.stats.connects += 1

    def data_received(self, data: bytes) -> None:
        if self.complete or not self.used:
            self._desync()
            return
        self.got_bytes = True
        # The timeout bounds silence, not the whole exchange, so streams may run long.
        self.deadline = self.loop.time() + self.timeout
        try:
            if not self.head_done:
                # Counted before the parser sees them: httptools keeps an unfinished header
                # in memory, so a cap checked in its callbacks would come after the damage.
                room = self.head_room
                self.head_room = room - len(data)
                if self.head_room < 0:
                    self._feed_within_head_limit(memoryview(data), room)
                    return
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError("protocol", "upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError("protocol", f"malformed response from upstream: {exc}"))

    def _feed_within_head_limit(self, data: memoryview, room: int) -> None:
        # The parser gets what the head may still take; the rest only if the head ended
        # within it (then it is body). Slices of a view: nothing copied.
        self.parser.feed_data(data[:room])
        if not self.head_done:
            limit = self.upstream.limits.max_head_bytes
            self.fail(UpstreamError("protocol", f"response head over {limit} bytes"))
            return
        self.parser.feed_data(data[room:])

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports it

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

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer (or junk) right behind a whole one, in the same read: stop
            # the parser here; feed_data raises and fail() retires the connection.
            raise UpstreamError("protocol", "bytes after a complete answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self._desync()
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 or status > 599:
            if 100 <= status < 200 and status != 101:
                # Interim response (100 Continue, 103 Early Hints): not forwarded.
                self.headers = []
                return
            # 101 would hand us another protocol; outside 100-599 is no HTTP status.
            self.fail(UpstreamError("protocol", f"the replica answered status {status}"))
            return
        if len(self.headers) > self.upstream.limits.max_headers:
            limit = self.upstream.limits.max_headers
            self.fail(UpstreamError("protocol", f"response head with over {limit} headers"))
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        if not self.keep_alive:
            # RFC 9112 §6.3: no length and no final "chunked" coding: the body ends at close.
            self.until_close = not any(
                n.lower() == b"content-length"
                or (n.lower() == b"transfer-encoding" and v.lower().rstrip().endswith(b"chunked"))
                for n, v in self.headers
            )
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
