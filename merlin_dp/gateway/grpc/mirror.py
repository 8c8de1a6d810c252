"""The mirror (shadow) copy of a gRPC call, and the comparison of the two answers.

A call whose rule mirrors it buffers a copy of its request (up to the shadow limit) and,
once the request is whole, sends it on its own stream to a replica of the shadow
version; the shadow's answer never reaches the client. The primary's answer is copied
as it passes (up to the same limit). When both have ended, and only then, the pair is
decoded as ``PredictValuesResponse`` and compared: grpc-status first, then the result
table and target name with the rule's relative tolerance (model metadata differ by
design and are ignored). Counters are the HTTP path's shadow counters
(:class:`merlin_dp.gateway.metrics.MirrorStats`).
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from merlin_dp.gateway.h2.codec import Block
from merlin_dp.gateway.h2.frames import CANCEL
from merlin_dp.gateway.h2.streams import Stream
from merlin_dp.gateway.metrics import GatewayMetrics, MirrorStats
from merlin_dp.gateway.mirror import MirrorLimits, json_agree
from merlin_dp.gateway.pool.h2 import UpstreamPool
from merlin_dp.gateway.pool.upstream import Upstream, UpstreamError
from merlin_dp.gateway.routing.balancer import choose_free
from merlin_dp.gateway.routing.table import MirrorTarget
from merlin_dp.protos.caraml.upi.v1 import upi_pb2
from merlin_dp.spec.signals import GRPC_SERVER_FAULTS

# A shadow that never answers must not hold a mirror slot for good.
MIRROR_TIMEOUT = 30.0


class Mirroring:
    """The worker's mirror sender: bounds and counters. Copies go out on the proxy's
    connection pool."""

    def __init__(
        self, metrics: GatewayMetrics, pool: UpstreamPool, limits: MirrorLimits | None = None
    ) -> None:
        self.metrics = metrics
        self.pool = pool
        self.limits = limits or MirrorLimits()
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def begin(self, mirror: MirrorTarget, head: bytes) -> MirrorCopy | None:
        target = mirror.version
        stats = self.metrics.mirror(target.project, target.model, target.version)
        if self.in_flight >= self.limits.max_in_flight:
            stats.count("dropped", "concurrency")
            return None
        self.in_flight += 1
        return MirrorCopy(self, mirror, stats, head)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class MirrorCopy:
    """One call's shadow: its request copied, sent once whole, and both answers compared."""

    __slots__ = ("answer", "answer_bytes", "answer_code", "ended", "head", "mirror", "owner",
                 "primary", "primary_bytes", "primary_code", "request", "request_bytes",
                 "started", "stats", "stream", "timer", "up")  # fmt: skip

    def __init__(
        self, owner: Mirroring, mirror: MirrorTarget, stats: MirrorStats, head: bytes
    ) -> None:
        self.owner = owner
        self.mirror = mirror
        self.stats = stats
        self.head = head
        self.request: list[bytes] | None = []
        self.request_bytes = 0
        self.primary: list[bytes] | None = []
        self.primary_bytes = 0
        self.primary_code: int | None = None
        self.answer: list[bytes] | None = []
        self.answer_bytes = 0
        self.answer_code: int | None = None
        self.ended = False  # the copy is over (answered, failed or dropped)
        self.started = perf_counter()
        self.stream: Stream | None = None
        self.up: Upstream | None = None
        self.timer: asyncio.TimerHandle | None = None

    # --- the primary's side -----------------------------------------------------------

    def request_data(self, data: bytes, end_stream: bool) -> None:
        request = self.request
        if request is None:
            return
        self.request_bytes += len(data)
        if self.request_bytes > self.owner.limits.max_body_bytes:
            self.request = None
            self._end("dropped", "body_too_large")
            return
        if data:
            request.append(data)
        if end_stream:
            self._launch()

    def primary_data(self, data: bytes) -> None:
        primary = self.primary
        if primary is None:
            return
        self.primary_bytes += len(data)
        if self.primary_bytes > self.owner.limits.max_body_bytes:
            self.primary = None
        else:
            primary.append(data)

    def primary_done(self, code: int) -> None:
        self.primary_code = code
        if self.request is not None and self.stream is None and self.up is None:
            # The primary ended before its request did (cancelled, deadline): no copy.
            self.request = None
            self._end("dropped", "primary_failed")
        self._maybe_compare()

    # --- the copy's side --------------------------------------------------------------

    def _launch(self) -> None:
        target = self.mirror.version
        up = choose_free(target.upstreams, target.limit)
        if up is None:
            if target.upstreams:
                # Every replica is at its limit: a copy never waits, nor passes the limit.
                self._end("dropped", "full")
            else:
                self._end("error", "no_replica")
            return
        up.outstanding += 1  # its slot until the copy ends (_end)
        self.up = up
        conn = self.owner.pool.get(up)
        if conn is not None:
            self._send(conn.open_stream(self, self.head, False))
            return
        task = asyncio.get_running_loop().create_task(self._connect(up))
        self.owner.tasks.add(task)
        task.add_done_callback(self.owner.tasks.discard)

    async def _connect(self, up: Upstream) -> None:
        try:
            conn = await self.owner.pool.connect(up)
        except UpstreamError as exc:
            up.record_failure()
            self._end("error", exc.kind)
            return
        if not conn.usable():
            self._end("error", "connect")
            return
        self._send(conn.open_stream(self, self.head, False))

    def _send(self, stream: Stream) -> None:
        self.stream = stream
        self.timer = asyncio.get_running_loop().call_later(MIRROR_TIMEOUT, self._time_out)
        request = self.request or []
        self.request = None
        for chunk in request:
            stream.send_data(chunk, False)
        stream.send_data(b"", True)

    def on_headers(self, stream: Stream, block: Block, end_stream: bool) -> None:
        if not end_stream:
            return
        code = 2
        for name, value in block.headers:
            if name == b"grpc-status" and value.isdigit():
                code = int(value)
        self.answer_code = code
        self.stats.latency.observe(perf_counter() - self.started)
        if code in GRPC_SERVER_FAULTS:
            self.stats.server_errors += 1
        self._end("sent", "")
        self._maybe_compare()

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        stream.consumed(len(data))
        answer = self.answer
        if answer is None:
            return
        self.answer_bytes += len(data)
        if self.answer_bytes > self.owner.limits.max_body_bytes:
            self.answer = None
        else:
            answer.append(data)
        if end_stream and self.answer_code is None:
            self._end("error", "protocol")

    def on_reset(self, stream: Stream, code: int) -> None:
        if self.answer_code is None:
            self._end("error", "reset")

    def _time_out(self) -> None:
        self.timer = None
        stream = self.stream
        if stream is not None and stream.open:
            stream.reset(CANCEL)
        self._end("error", "timeout")

    def _end(self, result: str, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.owner.in_flight -= 1
        self.stats.count(result, reason)
        up = self.up
        if up is not None:
            up.release()
            if result == "sent":
                up.record_success()
            elif result == "error":
                up.record_failure()

    def _maybe_compare(self) -> None:
        if self.primary_code is None or self.answer_code is None:
            return
        # After the client has its answer, on a later loop turn: never on the hot path.
        asyncio.get_running_loop().call_soon(self._compare)

    def _compare(self) -> None:
        primary_code, answer_code = self.primary_code, self.answer_code
        server_error = primary_code in GRPC_SERVER_FAULTS or answer_code in GRPC_SERVER_FAULTS
        status_differs = primary_code != answer_code
        self.stats.compared_pair(server_error, status_differs,
                                 not status_differs and self._bodies_differ())  # fmt: skip

    def _bodies_differ(self) -> bool:
        if self.primary is None or self.answer is None:
            return False  # too big to compare: the statuses agreed
        left = _decode(b"".join(self.primary))
        right = _decode(b"".join(self.answer))
        if left is None or right is None:
            return b"".join(self.primary) != b"".join(self.answer)
        return not json_agree(left, right, self.mirror.relative_tolerance)


def _decode(body: bytes) -> dict[str, Any] | None:
    """The comparable part of a one-message response: result table and target name."""
    if not body:
        return {}
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        return None  # compressed, or not a single message
    try:
        msg = upi_pb2.PredictValuesResponse.FromString(body[5:])
    except DecodeError:
        return None
    return {
        "table": MessageToDict(msg.prediction_result_table),
        "target_name": msg.target_name,
    }
