"""One proxied gRPC call: from the client's HEADERS to the replica and back.

:class:`GrpcProxy` is the acceptor of the gRPC listener. For each request stream it
finds the target by ``:authority`` in the same route table the HTTP path reads, picks
the version with the same rule objects (weights, header match on gRPC metadata,
sticky), picks a replica with the same balancer, and pairs the client's stream with a
stream on a pooled h2c connection to that replica. From then on frames pass through as
bytes; header blocks are decoded (cached) and re-encoded as literals, with
``x-model-version`` added to the response headers. What a request's header block says
is read once per distinct block (:mod:`merlin_dp.gateway.grpc.request`).

The gateway answers on its own, Trailers-Only, when it can't route (``NOT_FOUND``), has
no replica or none could take the call (``UNAVAILABLE``), or the call's deadline passes
(``DEADLINE_EXCEEDED``; the replica's stream is reset with CANCEL). The deadline is the
client's ``grpc-timeout`` capped by the route's timeout (the rule's ``timeout_seconds``,
as on HTTP); the replica gets the deadline that applies. A call is
retried on another replica only when the replica provably never saw it: the connect
failed, or the replica refused the stream (REFUSED_STREAM, or a GOAWAY below its id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from time import perf_counter
from types import MappingProxyType
from typing import TypeVar

from merlin_dp.gateway.activation import ActivationRefused, Activator
from merlin_dp.gateway.grpc import health
from merlin_dp.gateway.grpc.mirror import MirrorCopy, Mirroring
from merlin_dp.gateway.grpc.request import RequestHead, format_timeout
from merlin_dp.gateway.grpc.status import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    NOT_FOUND,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UNIMPLEMENTED,
    UNKNOWN,
    trailers,
    trailers_only,
)
from merlin_dp.gateway.h2 import frames as f
from merlin_dp.gateway.h2.codec import Block, encode_field
from merlin_dp.gateway.h2.streams import CONNECTION_LOST, Stream
from merlin_dp.gateway.metrics import CHOSEN_DIRECT, WRONG_PROTOCOL, GatewayMetrics, VersionStats
from merlin_dp.gateway.pool.h2 import UpstreamPool
from merlin_dp.gateway.pool.upstream import PoolLimits, Upstream, UpstreamError
from merlin_dp.gateway.request_ids import RequestIds
from merlin_dp.gateway.routing.balancer import choose, choose_free
from merlin_dp.gateway.routing.choice import choose_version
from merlin_dp.gateway.routing.table import (
    DIRECT_POLICY,
    EMPTY_TABLE,
    RoutePolicy,
    RouteTable,
    VersionTarget,
    describe,
)

# gRPC's mapping of HTTP/2 RST_STREAM codes to statuses (doc/PROTOCOL-HTTP2.md).
RST_TO_STATUS = MappingProxyType(
    {
        f.REFUSED_STREAM: UNAVAILABLE,
        f.CANCEL: CANCELLED,
        f.ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED,
        f.INADEQUATE_SECURITY: PERMISSION_DENIED,
        CONNECTION_LOST: UNAVAILABLE,
    }
)

# Request bodies kept to replay on another replica, while the replica might still
# refuse the stream; bigger calls are not retried after their first bytes went out.
REPLAY_BYTES = 1024 * 1024
# Times a call refused for a replica's stream limit is sent again without a retry spent.
BUSY_REDISPATCHES = 4

# GrpcCall.state: how far a call has got, in order (see GrpcCall for the transitions).
# Plain ints, not an IntEnum: the state is read on every frame of a call, and an enum
# member costs more to compare, and far more to look up on its class.
ROUTING = 0
WAITING = 1
SENT = 2
RESPONDING = 3
DONE = 4


# What the version's queue hands a call: a slot on a replica, or a newer version target.
_Handed = TypeVar("_Handed")


class GrpcProxy:
    """The acceptor of the gRPC listener: one per worker, reading ``self.table``."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        pool_limits: PoolLimits,
        activator: Activator | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.table: RouteTable = EMPTY_TABLE
        self.metrics = metrics
        self.ustats = metrics.upstream
        self.pool = UpstreamPool(self.loop, pool_limits, metrics.upstream)
        self.activator = activator
        self.request_ids = RequestIds()
        self.mirroring = Mirroring(metrics, self.pool)
        self._version_fields: dict[str, bytes] = {}
        self._timeout_fields: dict[float, bytes] = {}

    def version_field(self, version: VersionTarget) -> bytes:
        field = self._version_fields.get(version.version_header)
        if field is None:
            field = encode_field(b"x-model-version", version.version_header.encode())
            self._version_fields[version.version_header] = field
        return field

    def timeout_field(self, seconds: float) -> bytes:
        """``grpc-timeout`` for a route's timeout, encoded once per distinct value."""
        field = self._timeout_fields.get(seconds)
        if field is None:
            field = self._timeout_fields[seconds] = encode_field(
                b"grpc-timeout", format_timeout(seconds)
            )
        return field

    def accept(self, stream: Stream, block: Block, end_stream: bool) -> None:
        call = GrpcCall(self, stream)
        stream.handler = call
        call.start(block, end_stream)

    def trailers(self, stream: Stream, block: Block, end_stream: bool) -> None:
        handler = stream.handler
        if isinstance(handler, GrpcCall):
            handler.client_trailers(block)
        elif isinstance(handler, health.HealthCall):
            handler.request_end()

    async def close(self) -> None:
        await self.mirroring.close()
        self.pool.close()


class GrpcCall:
    """One proxied call: the client's stream and, once dispatched, a stream on a
    replica's connection; the handler of both.

    ``state`` is how far the call has got (the values are ordered):

    - ``ROUTING``: the client's HEADERS are in; :meth:`start` routes them.
    - ``WAITING``: routed, with no replica stream yet: a task waits for the version's
      activation (scaled to zero) or for a connection to the chosen replica. The
      request's bytes are held uncredited meanwhile.
    - ``SENT``: the request goes to a replica's stream (``upstream``) and nothing has
      been answered, so a refused stream can still go elsewhere.
    - ``RESPONDING``: the replica's response headers have gone to the client; frames
      pass through until its trailers.
    - ``DONE``: answered, failed or cancelled, and counted; what still arrives is
      dropped (and credited), except request bytes for a replica stream still open.

    Transitions:

    - ROUTING → DONE (:meth:`start`): a malformed request (reset), no route
      (NOT_FOUND), an HTTP_JSON endpoint (UNIMPLEMENTED), a health check (handed to
      :mod:`merlin_dp.gateway.grpc.health`);
    - ROUTING or WAITING → WAITING (``_dispatch``): an activation or a connect started,
      including after a failed connect is retried, or a connection that filled up
      while we waited for it;
    - ROUTING or WAITING → SENT (``_open``): a replica's stream opened;
    - SENT → WAITING or SENT: the replica refused the stream (REFUSED_STREAM, or above
      its GOAWAY) and the call goes to another connection or replica (``_retry``);
    - SENT → RESPONDING (:meth:`on_headers`): the replica's first header block;
    - any → DONE (``_complete``): the replica's trailers or reset, the client's reset,
      the deadline, no replica left or none that would take it.

    What is not progress keeps its own field: whether the request has ended
    (``body_end``) and can still be replayed (``replayable``), whether the one
    reconnect after a GOAWAY was spent (``reconnected``), the retry budgets
    (``retries_left``, ``busy_redispatches``), and the mirror copy (``mirror``).
    """

    __slots__ = (
        "block",
        "body",
        "body_bytes",
        "body_end",
        "busy_redispatches",
        "chosen",
        "client",
        "dispatched",
        "head",
        "held",
        "mirror",
        "policy",
        "proxy",
        "reconnected",
        "replayable",
        "req_trailers",
        "retries_left",
        "start_time",
        "state",
        "stats",
        "task",
        "timeout",
        "timeout_field",
        "timer",
        "tried",
        "up",
        "upstream",
        "version",
    )  # fmt: skip

    def __init__(self, proxy: GrpcProxy, client: Stream) -> None:
        self.proxy = proxy
        self.client = client
        self.state = ROUTING
        self.start_time = perf_counter()
        self.upstream: Stream | None = None
        self.up: Upstream | None = None
        self.held: Upstream | None = None  # a slot the version's queue handed us
        self.dispatched = 0.0  # when the replica's stream opened
        self.version: VersionTarget | None = None
        self.stats: VersionStats | None = None
        self.chosen = CHOSEN_DIRECT
        self.policy: RoutePolicy = DIRECT_POLICY
        self.body: list[bytes] = []  # not yet sent upstream, or kept for a replay
        self.body_bytes = 0
        self.body_end = False
        self.replayable = True
        self.reconnected = False  # one retry on the same replica after its GOAWAY
        self.req_trailers: bytes | None = None
        self.head = b""
        self.block: Block | None = None
        self.timeout: float | None = None
        self.timeout_field = b""  # the grpc-timeout field as the replica gets it
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.tried: list[Upstream] | None = None
        self.retries_left = 0
        self.busy_redispatches = 0
        self.mirror: MirrorCopy | None = None

    @property
    def done(self) -> bool:
        """The call has ended (``DONE``)."""
        return self.state == DONE

    # --- start --------------------------------------------------------------------

    def start(self, block: Block, end_stream: bool) -> None:
        proxy = self.proxy
        head = block.derived
        if head is None:
            head = block.derived = RequestHead(block)
        self.body_end = end_stream
        self.block = block
        if head.error is not None:
            self.client.conn.peer_reset(self.client)  # provoked: charged as a reset
            self.client.reset(f.PROTOCOL_ERROR)
            self.state = DONE
            return
        table = proxy.table
        target = table.by_host.get(head.authority)
        if target is None:
            proxy.metrics.count_unrouted(404)
            self._answer(
                NOT_FOUND, f"no model endpoint or version endpoint at {head.authority!r}", b""
            )
            self.state = DONE
            return
        if not target.grpc:
            # Sent on, it would reach an HTTP/1.1 replica that can't read it (and be
            # ejected for it). Counted as its HTTP counterpart is.
            proxy.metrics.count_unrouted(WRONG_PROTOCOL)
            self._answer(
                UNIMPLEMENTED, f"{describe(target)} serves HTTP_JSON; call it over HTTP", b""
            )
            self.state = DONE
            return
        if head.health is not None:
            self.state = DONE
            health.begin(
                self.client,
                target,
                head.health,
                block,
                head.timeout,
                proxy.loop,
                can_activate=proxy.activator is not None,
            )
            return
        version, self.chosen, self.policy, mirror = choose_version(target, head.metadata)
        self.version = version
        self.retries_left = self.policy.retries
        self.stats = version.stats
        fwd = head.forward
        conn = self.client.conn
        prior = head.forwarded_for
        if prior is None:
            fwd += conn.forwarded_for
        else:
            fwd += encode_field(b"x-forwarded-for", prior + b", " + conn.peer_host)
        if not head.has_request_id:
            # A literal field by hand: ids are far shorter than 127 bytes.
            rid = proxy.request_ids.next()
            fwd += b"\x00\x0cx-request-id" + bytes((len(rid),)) + rid
        timeout = head.timeout
        limit = self.policy.timeout
        if timeout is None or timeout > limit:
            # The route's timeout caps the call, as on HTTP, and the replica is told.
            field = proxy.timeout_field(limit)
            if timeout is None:
                fwd += field
            else:
                fwd = fwd.replace(encode_field(b"grpc-timeout", self._timeout_text()), field, 1)
            timeout = limit
            self.timeout_field = field
        elif self.block is not None:
            self.timeout_field = encode_field(b"grpc-timeout", self._timeout_text())
        self.head = fwd
        self.timeout = timeout
        self.timer = proxy.loop.call_later(timeout, self._deadline)
        if mirror is not None:
            self.mirror = proxy.mirroring.begin(mirror, fwd)
            if self.mirror is not None and end_stream:
                self.mirror.request_data(b"", True)
        self._dispatch()

    def _dispatch(self) -> None:
        if self.held is not None:  # a retry: the queue's slot goes back
            self.held.release()
            self.held = None
        version = self.version
        assert version is not None
        proxy = self.proxy
        upstreams = version.upstreams
        if not upstreams:
            if version.scale_to_zero and proxy.activator is not None and self.tried is None:
                self.state = WAITING
                self.task = proxy.loop.create_task(self._activate(proxy.activator))
                return
            self._fail(
                UNAVAILABLE,
                f"version endpoint {version.project}/{version.full_name} has no ready replica",
            )
            return
        limit = version.limit
        if not limit:
            up = choose(upstreams, self.tried)
        else:
            up = choose_free(upstreams, limit, self.tried)
            if up is None and proxy.activator is not None:
                # Every replica (not tried yet) is at its limit: wait in the version's
                # queue, a retry too.
                self.state = WAITING
                self.task = proxy.loop.create_task(self._queue(proxy.activator))
                return
            if up is not None:
                # The slot is ours from now, not from when the stream opens: a connect in
                # between must not let others past the limit.
                up.outstanding += 1
                self.held = up
        if up is None:
            self._fail(UNAVAILABLE, f"version endpoint {version.full_name}: no replica left")
            return
        self._dispatch_to(up)

    def _dispatch_to(self, up: Upstream) -> None:
        proxy = self.proxy
        conn = proxy.pool.get(up)
        if conn is None:
            self.state = WAITING
            self.task = proxy.loop.create_task(self._connect(up))
            return
        self._open(up, conn.open_stream(self, self.head, self._head_ends()))

    async def _waited(self, waiting: Awaitable[_Handed]) -> _Handed | None:
        """What the version's queue handed over; None when it refused (the call has
        failed UNAVAILABLE)."""
        try:
            handed = await waiting
        except ActivationRefused as exc:
            self.task = None
            self._fail(UNAVAILABLE, str(exc))
            return None
        self.task = None
        return handed

    async def _queue(self, activator: Activator) -> None:
        assert self.version is not None
        up = await self._waited(activator.wait_for_slot(self.version))
        if up is None:
            return
        if self.state == DONE:
            up.release()  # the slot goes on to the next in line
            return
        self.held = up  # its slot is ours until the stream opens, or we give up
        self._dispatch_to(up)

    async def _activate(self, activator: Activator) -> None:
        assert self.version is not None
        started = perf_counter()
        version = await self._waited(activator.activate(self.version))
        if version is None or self.state == DONE:
            return
        self.version = version
        if self.timeout is not None:
            # The replica gets what is left of the deadline after the hold.
            left = encode_field(
                b"grpc-timeout", format_timeout(self.timeout - (perf_counter() - started))
            )
            self.head = self.head.replace(self.timeout_field, left, 1)
            self.timeout_field = left
        self.tried = []  # no second activation
        self._dispatch()

    def _timeout_text(self) -> bytes:
        assert self.block is not None
        for name, value in self.block.headers:
            if name == b"grpc-timeout":
                return value
        return b""

    def _head_ends(self) -> bool:
        """The request is whole with its HEADERS: no body, no trailers to follow."""
        return self.body_end and not self.body and self.req_trailers is None

    async def _connect(self, up: Upstream) -> None:
        try:
            conn = await self.proxy.pool.connect(up)
        except UpstreamError as exc:
            self.task = None
            if exc.kind == "full":
                self._retry(up, str(exc))  # busy, not failed: no ejection
                return
            up.record_failure()
            self.proxy.ustats.error("connect")
            if self.held is up:
                # Its slot goes back but not to the queue: a replica that can't be
                # reached would fail whoever it was handed to.
                up.outstanding -= 1
                self.held = None
            self._retry(up, "no replica could be reached")
            return
        self.task = None
        if self.state == DONE:
            return
        if not conn.usable():
            if not (conn.closed or conn.draining or conn.goaway_received):
                # Merely full (others took its streams while we waited): find or open
                # another connection to the same replica; no retry is spent.
                self._dispatch()
                return
            self._retry(up, "the replica's connection was going away")
            return
        self._open(up, conn.open_stream(self, self.head, self._head_ends()))

    def _open(self, up: Upstream, stream: Stream) -> None:
        self.state = SENT
        self.up = up
        if self.held is up:
            self.held = None  # the queue counted it already
        else:
            up.outstanding += 1
        self.dispatched = perf_counter()
        self.upstream = stream
        stream.peer = self.client
        self.client.peer = stream
        body = self.body
        if body:
            last = len(body) - 1
            for i, chunk in enumerate(body):
                stream.send_data(chunk, self.body_end and i == last and self.req_trailers is None)
            if self.body_bytes > REPLAY_BYTES:
                body.clear()
                self.replayable = False
        if self.req_trailers is not None:
            stream.send_headers(self.req_trailers, True)

    def _served(self, up: Upstream) -> None:
        """The replica's stream ended: its slot is free, the exchange's time counted."""
        up.release()
        stats = self.stats
        if stats is not None:
            stats.served += 1
            stats.service_seconds += perf_counter() - self.dispatched

    def _retry(self, up: Upstream, reason: str, exclude: bool = True) -> None:
        """The replica never saw the call: try another, within the rule's retries."""
        if self.state == DONE:
            return
        if not self.replayable or self.retries_left <= 0:
            self._fail(UNAVAILABLE, f"version endpoint failed: {reason}")
            return
        self.retries_left -= 1
        self.proxy.ustats.retries += 1
        if exclude:
            self.tried = [up] if not self.tried else [*self.tried, up]
        elif self.tried is None:
            self.tried = []  # retrying: no activation hold
        self._dispatch()

    # --- frames from either side ------------------------------------------------------

    def on_headers(self, stream: Stream, block: Block, end_stream: bool) -> None:
        if stream is not self.upstream:
            return
        code = block.derived
        if code is None and end_stream:
            code = block.derived = _grpc_status(block)
        state = self.state
        if state == RESPONDING:
            self.client.send_headers(block.encoded(), end_stream)
        else:
            # The response's first block (or a block after the call ended, the replica's
            # stream still open): the request can't be replayed any more.
            self.body.clear()
            self.replayable = False
            if state < RESPONDING:
                self.state = RESPONDING
                assert self.version is not None
                out = block.encoded() + self.proxy.version_field(self.version)
                self.client.send_headers(out, end_stream)
        if end_stream:
            self._complete(code if code is not None else UNKNOWN, failed=False)

    def on_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        if stream is self.client:
            if end_stream:
                self.body_end = True
            if self.mirror is not None:
                self.mirror.request_data(data, end_stream)
            up = self.upstream
            if up is not None:
                if up.local_closed or not up.open:
                    stream.consumed(len(data))
                    return
                up.send_data(data, end_stream)
                if self.replayable:
                    self.body_bytes += len(data)
                    if self.body_bytes > REPLAY_BYTES:
                        self.body.clear()
                        self.replayable = False
                    else:
                        self.body.append(data)
            elif self.state == DONE:
                stream.consumed(len(data))
            else:
                # Held (not credited) until a replica takes the call: the client's
                # window bounds it.
                self.body.append(data)
                self.body_bytes += len(data)
            return
        if stream is not self.upstream or self.state == DONE:
            stream.consumed(len(data))
            return
        if self.mirror is not None:
            self.mirror.primary_data(data)
        self.client.send_data(data, end_stream)
        if end_stream:
            # A gRPC response ends with trailers; END_STREAM on DATA is the replica's
            # protocol error, which the client sees as a missing status.
            self._complete(UNKNOWN, failed=True)

    def client_trailers(self, block: Block) -> None:
        self.body_end = True
        literal = block.encoded()
        if self.replayable:
            self.req_trailers = literal  # a replay on another replica sends them too
        up = self.upstream
        if up is not None and up.open and not up.local_closed:
            up.send_headers(literal, True)
        else:
            self.req_trailers = literal

    def on_reset(self, stream: Stream, code: int) -> None:
        if stream is self.client:
            # The client cancelled, or its connection is gone: the replica stops too.
            up = self.upstream
            if up is not None and up.open:
                up.reset(f.CANCEL)
            self._complete(CANCELLED, failed=False)
            return
        if stream is not self.upstream:
            return
        self.upstream = None
        self.client.peer = None
        if self.state == DONE:
            client = self.client
            if code == f.NO_ERROR and client.open and not client.remote_closed:
                client.reset(f.NO_ERROR)  # the replica's "stop sending", passed on
            return
        up_ = self.up
        assert up_ is not None
        self._served(up_)
        self.up = None
        if code == CONNECTION_LOST or code not in (f.CANCEL, f.REFUSED_STREAM, f.NO_ERROR):
            up_.record_failure()
            self.proxy.ustats.error("reset")
        if code == f.REFUSED_STREAM and self.state < RESPONDING:
            conn = stream.conn
            if (
                self.replayable
                and not conn.goaway_received
                and len(conn.streams) >= conn.peer_settings.max_streams
                and self.busy_redispatches < BUSY_REDISPATCHES
            ):
                # Refused for the replica's stream limit (opened before its SETTINGS said
                # so, in a burst): the replica is busy, not failing; another connection
                # to it, or another replica, without spending a retry.
                self.busy_redispatches += 1
                self._dispatch()
                return
            # Above a GOAWAY's last-stream-id the replica is going away gracefully (a
            # restart, a max connection age): a fresh connection to it may serve.
            fresh = stream.conn.goaway_received and not self.reconnected
            self.reconnected = self.reconnected or fresh
            self._retry(up_, "the replica refused the call", exclude=not fresh)
            return
        status = RST_TO_STATUS.get(code, INTERNAL)
        if self.state < RESPONDING:
            self._fail(status, _reset_reason(code))
        elif code == CONNECTION_LOST:
            self.client.send_headers(trailers(UNAVAILABLE, _reset_reason(code)), True)
            self._complete(UNAVAILABLE, failed=True)
        else:
            self.client.reset(code)
            self._complete(status, failed=True)

    # --- ends ---------------------------------------------------------------------

    def _deadline(self) -> None:
        self.timer = None
        if self.state == DONE:
            return
        up = self.upstream
        if up is not None and up.open:
            up.reset(f.CANCEL)
        self.upstream = None
        if self.state == RESPONDING:
            self.client.send_headers(trailers(DEADLINE_EXCEEDED, "deadline exceeded"), True)
            self._end_client()
            self._complete(DEADLINE_EXCEEDED, failed=False)
        else:
            self._fail(DEADLINE_EXCEEDED, "deadline exceeded")

    def _fail(self, code: int, message: str) -> None:
        extra = b"" if self.version is None else self.proxy.version_field(self.version)
        self._answer(code, message, extra)
        self._complete(code, failed=code == UNAVAILABLE)

    def _answer(self, code: int, message: str, extra: bytes) -> None:
        """Our own status, Trailers-Only, unless a response has begun; the caller then
        ends the call (DONE)."""
        if self.state < RESPONDING and self.client.open:
            self.client.send_headers(trailers_only(code, message, extra), True)
        self._end_client()

    def _end_client(self) -> None:
        # The answer is out while the request may still be streaming: tell the client
        # to stop sending (RFC 9113 §8.1).
        client = self.client
        if client.open and not client.remote_closed and not client.pending:
            # (With frames still queued the reset would drop them, our status included;
            # the stream then ends when they are written.)
            client.reset(f.NO_ERROR)

    def _complete(self, code: int, failed: bool) -> None:
        if self.state == DONE:
            return
        self.state = DONE
        if self.held is not None:
            self.held.release()
            self.held = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            self.task = None
        self.body = []
        up = self.up
        if up is not None:
            if failed:
                up.record_failure()
            else:
                up.record_success()
            self._served(up)
            self.up = None
        stats = self.stats
        if stats is not None:
            stats.in_flight -= 1
            stats.record_grpc(self.chosen, code, perf_counter() - self.start_time)
        if self.mirror is not None:
            self.mirror.primary_done(code)


def _grpc_status(block: Block) -> int:
    for name, value in block.headers:
        if name == b"grpc-status":
            try:
                return int(value)
            except ValueError:
                return UNKNOWN
    return UNKNOWN


def _reset_reason(code: int) -> str:
    if code == CONNECTION_LOST:
        return "the connection to the replica was lost"
    if code == f.REFUSED_STREAM:
        return "the replica refused the call"
    return f"the replica reset the call (HTTP/2 error {code})"
