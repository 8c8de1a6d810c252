"""The server side of HTTP/2: client-facing connections and the listener that accepts them.

A :class:`ServerConnection` checks the client preface, opens a stream per request
HEADERS and hands it to the :class:`Acceptor` (the front that serves it: the gRPC proxy),
enforces the limits a public port needs (concurrent streams, queued answers, header list
size, CONTINUATION floods, rapid reset, control-frame floods, idle and handshake
timeouts) by answering GOAWAY, and drains with GOAWAY on shutdown. :class:`H2Listener`
owns a listening socket, its connections and the one ticker that checks their timeouts.
Nothing here knows what the streams carry.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.codec import Block, encode_field
from merlin_dp.gateway.h2.connection import H2Connection, log
from merlin_dp.gateway.h2.limits import H2Limits, TokenBucket
from merlin_dp.gateway.h2.streams import RecentResets, Stream


class Acceptor(Protocol):
    """The front a listener's streams go to: a new request, and a request's trailers."""

    def accept(self, stream: Stream, block: Block, end_stream: bool) -> None: ...

    def trailers(self, stream: Stream, block: Block, end_stream: bool) -> None: ...


class ServerConnection(H2Connection):
    """One client's connection: a stream per request, within the limits."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limits: H2Limits,
        acceptor: Acceptor,
        listener: H2Listener,
    ) -> None:
        super().__init__(loop, limits)
        self.acceptor = acceptor
        self.listener = listener
        self.preface_done = False
        self.opened_at = loop.time()
        self._resets = TokenBucket(limits.reset_burst, limits.resets_per_second, self.opened_at)
        self._pre = b""
        self._first_frame_checked = False
        # Streams we reset or refused lately: their late HEADERS are ignored; any other
        # HEADERS on a used stream id is a connection error (RFC 9113 §5.1.1).
        self.reset_ids = RecentResets()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_host = str(peer[0]).encode()
            self.forwarded_for = encode_field(b"x-forwarded-for", self.peer_host)

    def lost(self) -> None:
        self.listener.connections.discard(self)

    # A client that doesn't read must not make us write on its behalf: while its answers
    # wait (the transport is paused, or a turn queued more than OUT_LIMIT), its requests
    # (each could be answered with a header block) are not read.
    def pause_writing(self) -> None:
        super().pause_writing()
        self.hold_reads()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.paused:
            self.release_reads()

    def hold_reads(self) -> bool:
        if self.transport is None or self.closed:
            return False
        if not self.reads_held:
            self.reads_held = True
            self.transport.pause_reading()
        return True

    def release_reads(self) -> None:
        if not self.reads_held or self.transport is None or self.closed:
            return
        self.reads_held = False
        self.transport.resume_reading()
        if self._buf:
            # What was read but held back: parse it now, as if it had just arrived.
            self.loop.call_soon(self.data_received, b"")

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.preface_done:
            if not self._first_frame_checked:
                head = self._buf + data
                if len(head) >= 4:
                    self._first_frame_checked = True
                    # RFC 9113 §3.4: the preface's SETTINGS frame comes first.
                    if head[3] != f.SETTINGS:
                        self.fail(f.PROTOCOL_ERROR, "the preface must be followed by SETTINGS")
                        return
            super().data_received(data)
            return
        data = self._pre + data
        if len(data) < len(f.PREFACE):
            if not f.PREFACE.startswith(data):
                self.fail(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            self._pre = data
            return
        if not data.startswith(f.PREFACE):
            self.fail(f.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            return
        self.preface_done = True
        self._pre = b""
        rest = data[len(f.PREFACE) :]
        if rest:
            self.data_received(rest)

    def on_header_block(self, sid: int, block: Block, end_stream: bool) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            if stream.remote_closed:
                self.fail(f.STREAM_CLOSED, "HEADERS on a half-closed stream")
                return
            if not end_stream:
                self.fail(f.PROTOCOL_ERROR, "trailers without END_STREAM")
                return
            stream.remote_closed = True
            self.acceptor.trailers(stream, block, end_stream)
            if stream.local_closed:
                self._closed(stream)
            return
        if sid <= self.last_peer_stream:
            if sid in self.reset_ids:
                return  # a stream we reset: the block only kept HPACK in step
            self.fail(f.PROTOCOL_ERROR, f"HEADERS on closed stream {sid}")
            return
        if not sid & 1:
            self.fail(f.PROTOCOL_ERROR, "client stream ids are odd")
            return
        self.last_peer_stream = sid
        if (
            self.goaway_sent
            or len(self.streams) >= self.limits.max_concurrent_streams
            # Answers already waiting for this client to read: no new call until it does.
            or (self.blocked and self.queued_bytes() >= self.limits.queued_budget)
        ):
            self.send(f.rst_stream(sid, f.REFUSED_STREAM))
            self.reset_ids.add(sid)
            return
        stream = Stream(self, sid, _NO_HANDLER)
        stream.remote_closed = end_stream
        self.streams[sid] = stream
        try:
            self.acceptor.accept(stream, block, end_stream)
        except Exception:
            # A bug of ours costs this stream, not the connection's other calls.
            log.exception("accepting stream %d failed", sid)
            self.reset_stream(stream, f.INTERNAL_ERROR)

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        # The client stops opening streams; ours finish, then the client closes.
        if not self.streams:
            self.close()

    def reset_stream(self, stream: Stream, code: int) -> None:
        if self.streams.get(stream.id) is stream and not stream.remote_closed:
            self.reset_ids.add(stream.id)
        super().reset_stream(stream, code)

    def peer_reset(self, stream: Stream) -> None:
        if not self._resets.take(self.loop.time()):
            self.fail(f.ENHANCE_YOUR_CALM, "too many streams reset")

    def stream_closed(self, stream: Stream) -> None:
        self.last_active = self.loop.time()
        if not self.streams and (self.goaway_sent or self.goaway_received):
            self.close()

    def drain(self) -> None:
        """GOAWAY(NO_ERROR): streams up to the last we saw finish; newer are refused."""
        if self.closed or self.transport is None:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self.send(f.goaway(self.last_peer_stream, f.NO_ERROR))
        if not self.streams:
            self.close()

    def tick(self, now: float) -> None:
        lim = self.limits
        if not self.peer_settings.received and now - self.opened_at > lim.handshake_seconds:
            self.fail(f.PROTOCOL_ERROR, "no connection preface in time")
        elif not self.streams and now - self.last_active > lim.idle_seconds:
            self.drain()


class _NoHandler:
    """Placeholder until the acceptor sets the stream's handler."""

    def on_headers(self, stream: Stream, block: Block, end_stream: bool) -> None:
        pass

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        stream.consumed(len(data))

    def on_reset(self, stream: Stream, code: int) -> None:
        pass


_NO_HANDLER = _NoHandler()


class H2Listener:
    """One listening socket of one worker (the gRPC port): its connections, their
    timeouts, and the drain on shutdown."""

    TICK = 1.0

    def __init__(self, acceptor: Acceptor, limits: H2Limits | None = None) -> None:
        self.acceptor = acceptor
        self.limits = limits or H2Limits()
        self.loop = asyncio.get_running_loop()
        self.connections: set[ServerConnection] = set()
        self.server: asyncio.Server | None = None
        self._ticker: asyncio.TimerHandle | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = self.loop
        limits = self.limits
        self.server = await loop.create_server(
            lambda: ServerConnection(loop, limits, self.acceptor, self), sock=sock
        )
        self._ticker = loop.call_later(self.TICK, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            conn.tick(now)
        self._ticker = self.loop.call_later(self.TICK, self._tick)

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, wait for their streams (up to
        ``grace``), then close whatever is left."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.drain()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.server is not None:
            await self.server.wait_closed()
