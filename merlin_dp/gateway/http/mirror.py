"""Mirroring on the HTTP front: copy a share of requests to a candidate version and
compare the answers.

A mirrored copy never delays or fails the primary. :meth:`Mirroring.launch` is called
with the primary's already-buffered body and a ready-made request head; it drops the
copy (and counts why) when the body is over the size bound or too many copies are in
flight. Otherwise the copy goes out on a pooled connection to the candidate and is
driven by the connection's callbacks — no task, no future — unless a new connection
must be opened first (then one task does the connect). When both answers are in (the
handler reports the primary's through :meth:`MirrorCopy.primary_done`), they are
compared: status, then body (:func:`merlin_dp.gateway.mirror.bodies_agree`). The client
only ever sees the primary's answer.
"""

from __future__ import annotations

import asyncio
from time import perf_counter

from merlin_dp.gateway.metrics import GatewayMetrics, MirrorStats
from merlin_dp.gateway.mirror import MirrorLimits, bodies_agree
from merlin_dp.gateway.pool.http1 import Http1Pool, UpstreamConnection
from merlin_dp.gateway.pool.upstream import Upstream, UpstreamError
from merlin_dp.gateway.routing.balancer import choose_free
from merlin_dp.gateway.routing.table import MirrorTarget


class MirrorCopy:
    """One mirrored copy in flight, and the comparison once both answers are in."""

    __slots__ = (
        "answer",
        "conn",
        "owner",
        "primary",
        "started",
        "stats",
        "tolerance",
        "up",
    )

    def __init__(self, owner: Mirroring, stats: MirrorStats, tolerance: float) -> None:
        self.owner = owner
        self.stats = stats
        self.tolerance = tolerance
        self.started = perf_counter()
        self.up: Upstream | None = None
        self.conn: UpstreamConnection | None = None
        self.primary: tuple[int, bytes | None] | None = None
        self.answer: tuple[int, bytes] | None = None  # None while in flight or failed

    # --- the primary's side ---------------------------------------------------------

    def primary_done(self, status: int, body: bytes | None) -> None:
        """``body`` is None when the primary streamed (too big to compare); a negative
        status means the primary never answered (nothing to compare)."""
        self.primary = (status, body)
        if self.answer is not None:
            self._compare()

    # --- the copy's side --------------------------------------------------------------

    def send(self, up: Upstream, conn: UpstreamConnection, data: bytes, silence: float) -> None:
        self.up = up
        self.conn = conn
        conn.listener = self._progress
        conn.begin(data, False, silence)

    def _progress(self) -> None:
        conn = self.conn
        assert conn is not None and self.up is not None
        if conn.error is not None:
            self._finish(None, conn.error.kind)
        elif conn.complete:
            self._finish(conn, "")
        elif conn.buffered > self.owner.limits.max_body_bytes:
            conn.abort()
            self._finish(None, "too_large")

    def _finish(self, conn: UpstreamConnection | None, error: str) -> None:
        this = self.conn
        up = self.up
        assert this is not None and up is not None
        this.listener = None
        this.finish()
        up.release()
        self.owner.in_flight -= 1
        if conn is None:
            up.record_failure()
            self.stats.count("error", error)
            return
        chunks = conn.take_chunks()
        status = conn.status
        if status >= 500:
            up.record_failure()
            self.stats.server_errors += 1
        else:
            up.record_success()
        self.owner.pool.release(conn)
        self.stats.latency.observe(perf_counter() - self.started)
        self.stats.count("sent", "")
        self.answer = (status, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self.primary is not None:
            self._compare()

    def _compare(self) -> None:
        assert self.primary is not None and self.answer is not None
        primary_status, primary_body = self.primary
        if primary_status < 0:
            return
        status, body = self.answer
        status_differs = primary_status != status
        self.stats.compared_pair(
            primary_status >= 500 or status >= 500,
            status_differs,
            not status_differs
            and primary_body is not None
            and not bodies_agree(primary_body, body, self.tolerance),
        )


class Mirroring:
    """The worker's sender of mirrored copies: bounds and counters."""

    def __init__(
        self, metrics: GatewayMetrics, pool: Http1Pool, limits: MirrorLimits | None = None
    ) -> None:
        self.metrics = metrics
        self.pool = pool
        self.limits = limits or MirrorLimits()
        self.loop = asyncio.get_running_loop()
        self.in_flight = 0
        self._connecting: set[asyncio.Task[None]] = set()

    def launch(
        self, mirror: MirrorTarget, head: bytes, body: bytes | None, silence: float
    ) -> MirrorCopy | None:
        target = mirror.version
        stats = self.metrics.mirror(target.project, target.model, target.version)
        if body is None or len(body) > self.limits.max_body_bytes:
            stats.count("dropped", "body_too_large")
            return None
        if self.in_flight >= self.limits.max_in_flight:
            stats.count("dropped", "concurrency")
            return None
        up = choose_free(target.upstreams, target.limit)
        if up is None:
            if target.upstreams:
                # Every replica is at its limit: a copy never waits, nor passes the limit.
                stats.count("dropped", "full")
            else:
                stats.count("error", "no_replica")
            return None
        up.outstanding += 1  # its slot, taken now (before any connect)
        copy = MirrorCopy(self, stats, mirror.relative_tolerance)
        self.in_flight += 1
        data = head + body if body else head
        conn = self.pool.take_idle(up)
        if conn is not None:
            copy.send(up, conn, data, silence)
        else:
            task = self.loop.create_task(self._connect_and_send(copy, up, data, silence))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
        return copy

    async def _connect_and_send(
        self, copy: MirrorCopy, up: Upstream, data: bytes, silence: float
    ) -> None:
        try:
            conn = await self.pool.connect(up)
        except UpstreamError as exc:
            up.outstanding -= 1  # back, not handed on: the replica can't be reached
            up.record_failure()
            self.in_flight -= 1
            copy.stats.count("error", exc.kind)
            return
        copy.send(up, conn, data, silence)

    async def close(self) -> None:
        for task in list(self._connecting):
            task.cancel()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
