"""Persistent h2c connections to replicas, pooled per replica address.

A replica's connection carries many calls at once (up to the replica's
MAX_CONCURRENT_STREAMS); the pool opens another only when every connection is full or
going away, and concurrent callers wait on one connect rather than each opening their
own. A GOAWAY from the replica hands back, as REFUSED_STREAM, every stream above its
last-stream-id: the replica never saw those, so they may be retried elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib

from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.codec import Block
from merlin_dp.gateway.h2.connection import H2Connection
from merlin_dp.gateway.h2.limits import H2Limits
from merlin_dp.gateway.h2.streams import Stream, StreamHandler
from merlin_dp.gateway.pool.upstream import (
    PoolLimits,
    Upstream,
    UpstreamError,
    UpstreamStats,
    connect_to,
)

# Replicas are ours and trusted; the limits only shape windows and header sizes.
UPSTREAM_LIMITS = H2Limits(
    control_burst=10_000, control_per_second=10_000.0, max_header_list_size=64 * 1024
)
MAX_CONNECTIONS_PER_REPLICA = 16
IDLE_SECONDS = 60.0


class UpstreamH2(H2Connection):
    """One h2c connection to a replica: streams we open, answered by the replica."""

    credit_on_receipt = True
    client_side = True

    def __init__(
        self, loop: asyncio.AbstractEventLoop, limits: H2Limits, pool: UpstreamPool, up: Upstream
    ) -> None:
        super().__init__(loop, limits)
        self.pool = pool
        self.up = up

        self.next_id = 1
        self.draining = False

    def initial_frames(self) -> bytes:
        return f.PREFACE + super().initial_frames()

    def lost(self) -> None:
        self.pool.discard(self)

    def usable(self) -> bool:
        return (
            not self.closed
            and not self.draining
            and not self.goaway_received
            and len(self.streams) < self.peer_settings.max_streams
        )

    def open_stream(self, handler: StreamHandler, block: bytes, end_stream: bool) -> Stream:
        sid = self.next_id
        self.next_id += 2
        if self.next_id > f.MAX_STREAM_ID:
            self.draining = True
        stream = Stream(self, sid, handler)
        self.streams[sid] = stream
        self._write_headers(stream, block, end_stream)
        return stream

    def on_header_block(self, sid: int, block: Block, end_stream: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return  # a stream we reset: the block only kept HPACK in step
        if end_stream:
            stream.remote_closed = True
        stream.handler.on_headers(stream, block, end_stream)
        if end_stream and stream.local_closed:
            self._closed(stream)

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        self.draining = True
        unseen = [s for sid, s in self.streams.items() if sid > last_stream_id]
        for stream in unseen:
            del self.streams[stream.id]
            self.blocked.pop(stream.id, None)
            stream.pending.clear()
            stream.handler.on_reset(stream, f.REFUSED_STREAM)
        if not self.streams:
            self.close()

    def stream_closed(self, stream: Stream) -> None:
        self.last_active = self.loop.time()
        if self.draining and not self.streams:
            self.close()


class UpstreamPool:
    """The worker's h2c connections, per replica (:class:`Upstream`)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, limits: PoolLimits, stats: UpstreamStats
    ) -> None:
        self.loop = loop
        self.limits = limits
        self.stats = stats
        self.conns: dict[Upstream, list[UpstreamH2]] = {}
        self._connecting: dict[Upstream, asyncio.Task[UpstreamH2]] = {}
        self._ticker: asyncio.TimerHandle | None = loop.call_later(1.0, self._tick)

    def get(self, up: Upstream) -> UpstreamH2 | None:
        conns = self.conns.get(up)
        if conns:
            for conn in conns:
                if conn.usable():
                    return conn
        return None

    async def connect(self, up: Upstream) -> UpstreamH2:
        # The connect is the pool's task, not the caller's: a caller that gives up (its
        # client left) must not cancel the connect others wait on.
        pending = self._connecting.get(up)
        if pending is None:
            if len(self.conns.get(up, ())) >= MAX_CONNECTIONS_PER_REPLICA:
                # Busy, not broken: the caller must not count it against the replica.
                raise UpstreamError("full", f"{up.address}: every connection is full")
            pending = self.loop.create_task(self._open(up))
            self._connecting[up] = pending
            pending.add_done_callback(lambda task: self._connected(up, task))
        return await asyncio.shield(pending)

    def _connected(self, up: Upstream, task: asyncio.Task[UpstreamH2]) -> None:
        if self._connecting.get(up) is task:
            del self._connecting[up]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have left

    async def _open(self, up: Upstream) -> UpstreamH2:
        loop = self.loop
        conn = await connect_to(
            up, lambda: UpstreamH2(loop, UPSTREAM_LIMITS, self, up), self.limits.connect_timeout
        )
        self.stats.connects += 1
        self.conns.setdefault(up, []).append(conn)
        return conn

    def discard(self, conn: UpstreamH2) -> None:
        conns = self.conns.get(conn.up)
        if conns is not None:
            with contextlib.suppress(ValueError):
                conns.remove(conn)
            if not conns:
                del self.conns[conn.up]

    def _tick(self) -> None:
        now = self.loop.time()
        for up, conns in list(self.conns.items()):
            for conn in list(conns):
                if not conn.streams and (up.draining or now - conn.last_active > IDLE_SECONDS):
                    conn.draining = True
                    conn.close()
                elif up.draining:
                    conn.draining = True  # closes when its last stream ends
        self._ticker = self.loop.call_later(1.0, self._tick)

    def close(self) -> None:
        for task in list(self._connecting.values()):
            task.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for conns in list(self.conns.values()):
            for conn in list(conns):
                if conn.transport is not None:
                    conn.transport.abort()
        self.conns.clear()
