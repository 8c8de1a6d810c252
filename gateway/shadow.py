"""Shadow traffic: copy a share of requests to a candidate version and compare answers.

A mirrored copy never delays or fails the primary. :meth:`Shadowing.launch` is called
with the primary's already-buffered body; it drops the copy (and counts why) when the
body is over the size bound or too many copies are in flight, else starts one task that
sends the copy over the candidate's connection pool. When the primary has answered, the
handler calls :meth:`Shadow.primary_done`; the task then compares the two answers off
the hot path: status, and body JSON-aware (key order ignored, numbers equal within a
relative tolerance), bytes otherwise. The client only ever sees the primary's answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from gateway.balancer import choose
from gateway.metrics import GatewayMetrics, ShadowStats
from gateway.table import MirrorTarget
from gateway.upstream import UpstreamError

log = logging.getLogger("gateway.shadow")


@dataclass(frozen=True, slots=True)
class ShadowLimits:
    max_in_flight: int = 128
    max_body_bytes: int = 256 * 1024  # request copies and shadow answers alike


class Shadow:
    """One mirrored copy; the handler reports the primary's answer through it."""

    __slots__ = ("primary",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.primary: asyncio.Future[tuple[int, bytes | None]] = loop.create_future()

    def primary_done(self, status: int, body: bytes | None) -> None:
        """``body`` is None when the primary streamed (too big to compare); a negative
        status means the primary never answered."""
        if not self.primary.done():
            self.primary.set_result((status, body))


class Shadowing:
    """The worker's shadow sender: bounds, counters, and the comparison."""

    def __init__(self, metrics: GatewayMetrics, limits: ShadowLimits | None = None) -> None:
        self.metrics = metrics
        self.limits = limits or ShadowLimits()
        self.loop = asyncio.get_running_loop()
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def launch(
        self, mirror: MirrorTarget, head: bytes, body: bytes | None, silence: float
    ) -> Shadow | None:
        target = mirror.version
        stats = self.metrics.shadow(target.project, target.model, target.version)
        if body is None or len(body) > self.limits.max_body_bytes:
            stats.count("dropped", "body_too_large")
            return None
        if self.in_flight >= self.limits.max_in_flight:
            stats.count("dropped", "concurrency")
            return None
        shadow = Shadow(self.loop)
        self.in_flight += 1
        task = self.loop.create_task(self._run(shadow, mirror, stats, head, body, silence))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return shadow

    async def _run(
        self,
        shadow: Shadow,
        mirror: MirrorTarget,
        stats: ShadowStats,
        head: bytes,
        body: bytes,
        silence: float,
    ) -> None:
        started = perf_counter()
        try:
            status, answer = await self._exchange(mirror, head + body, silence)
        except UpstreamError as exc:
            stats.count("error", exc.kind)
            return
        finally:
            self.in_flight -= 1
        stats.latency.observe(perf_counter() - started)
        stats.count("sent", "")
        primary_status, primary_body = await shadow.primary
        if primary_status < 0:
            return  # the primary never answered (client gone): nothing to compare
        stats.compared += 1
        if primary_status != status:
            stats.mismatch["status"] = stats.mismatch.get("status", 0) + 1
        elif primary_body is not None and not bodies_agree(
            primary_body, answer, mirror.relative_tolerance
        ):
            stats.mismatch["body"] = stats.mismatch.get("body", 0) + 1

    async def _exchange(
        self, mirror: MirrorTarget, data: bytes, silence: float
    ) -> tuple[int, bytes]:
        target = mirror.version
        up = choose(target.upstreams)
        if up is None:
            raise UpstreamError(
                "connect", f"shadow version {target.full_name} has no ready replica"
            )
        conn = up.take_idle()
        if conn is None:
            try:
                conn = await up.connect()
            except UpstreamError:
                up.record_failure()
                raise
        up.outstanding += 1
        conn.begin(data, False, silence)
        try:
            size = 0
            while not conn.complete:
                if conn.error is not None:
                    up.record_failure()
                    raise conn.error
                size = conn.buffered
                if size > self.limits.max_body_bytes:
                    conn.abort()
                    raise UpstreamError("too_large", "shadow answer over the size bound")
                await conn.wait()
            chunks = conn.take_chunks()
            status = conn.status
            if status >= 500:
                up.record_failure()
            else:
                up.record_success()
            up.release(conn)
            return status, b"".join(chunks)
        finally:
            conn.finish()
            up.outstanding -= 1

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def bodies_agree(a: bytes, b: bytes, rel_tol: float) -> bool:
    """JSON-aware equality: key order ignored, numbers within ``rel_tol``; else bytes."""
    if a == b:
        return True
    try:
        left, right = json.loads(a), json.loads(b)
    except ValueError:
        return False
    return json_agree(left, right, rel_tol)


def json_agree(a: Any, b: Any, rel_tol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_agree(a[k], b[k], rel_tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            json_agree(x, y, rel_tol) for x, y in zip(a, b, strict=True)
        )
    return bool(a == b)
