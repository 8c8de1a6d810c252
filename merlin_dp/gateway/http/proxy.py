"""The HTTP_JSON hot path: from a client request to a replica's response.

:class:`Proxy.handle` finds the target by Host (or the ``/serving/`` path form), picks a
version by the compiled rule, picks a replica, and relays the exchange over a pooled
keep-alive connection. Small request bodies are read whole and written with the head
in one send (and can be replayed on retry); larger or chunked ones stream with
backpressure. Responses that arrive whole are answered with one ``Response``; others
stream back with bounded buffering. Nothing here parses a body.

The handler reads ``self.table`` once per request; a swap assigns a new table, so a
request finishes on the table it started with.

What is routed is what is forwarded: an absolute-form target (``GET http://host/path``)
is routed by its authority, which also replaces ``Host`` (RFC 9112 §3.2.2, as nginx
does), and goes on in origin-form; dot-segments (``.``, ``..``, percent-encoded or not)
are resolved before the lookup (RFC 3986 §5.2.4), and a path climbing above the root
is refused. The gateway answers ``CONNECT`` and ``TRACE`` itself (405, as nginx does),
``OPTIONS *`` (400, as nginx), and a transfer coding other than plain ``chunked``
(501: RFC 9112 §6.1; forwarding it would hand the replica a body coded in a way its
headers no longer say).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from merlin_dp.gateway.activation import ActivationRefused, Activator
from merlin_dp.gateway.errors import ClientGone
from merlin_dp.gateway.http.mirror import MirrorCopy, Mirroring
from merlin_dp.gateway.http.request import BadBody, HttpRequest
from merlin_dp.gateway.http.responses import (
    PLAIN_CONNECTION,
    Answer,
    error_answer,
    relay,
    streamed_head,
    without_named,
)
from merlin_dp.gateway.metrics import WRONG_PROTOCOL, GatewayMetrics
from merlin_dp.gateway.mirror import MirrorLimits
from merlin_dp.gateway.pool.http1 import Http1Pool, UpstreamConnection
from merlin_dp.gateway.pool.upstream import ClientSideError, Upstream, UpstreamError
from merlin_dp.gateway.request_ids import RequestIds
from merlin_dp.gateway.routing.balancer import choose, choose_free
from merlin_dp.gateway.routing.choice import choose_version
from merlin_dp.gateway.routing.table import (
    EMPTY_TABLE,
    MirrorTarget,
    ModelTarget,
    RoutePolicy,
    RouteTable,
    Target,
    VersionTarget,
    describe,
)

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward. Expect is
# answered by our own server (we read the body ourselves), Host travels as is.
REQUEST_HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"expect",
    }
)  # fmt: skip
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Answered here, as nginx does: CONNECT asks for a tunnel, TRACE for an echo of the
# request (credentials and all) from whatever replica.
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# What the gateway passes on (a 405 must say: RFC 9110 §15.5.6).
FORWARDED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
PATH_FORM_PREFIX = "/serving/"

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_body_bytes: int = 64 * 1024 * 1024
    # Bodies up to this size are read whole before sending: one write, and replayable.
    buffer_body_bytes: int = 256 * 1024

    def __reduce__(self) -> tuple[type[ProxyLimits], tuple[int, int]]:
        # Pickled to worker processes; compiled, a frozen dataclass is rebuilt only
        # through its constructor (unpickling would set its fields one by one).
        return (ProxyLimits, (self.max_body_bytes, self.buffer_body_bytes))


class Proxy:
    """The request handler for the traffic port."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        pool: Http1Pool,
        limits: ProxyLimits | None = None,
        mirror_limits: MirrorLimits | None = None,
    ) -> None:
        self.table: RouteTable = EMPTY_TABLE
        self.metrics = metrics
        self.pool = pool
        self.upstream_stats = pool.stats
        self.limits = limits or ProxyLimits()
        self.request_ids = RequestIds()
        self.loop = asyncio.get_running_loop()
        self.mirroring = Mirroring(metrics, pool, mirror_limits)
        self.activator: Activator | None = None
        self.grpc_port: int | None = None  # where UPI_V1 endpoints are served, if anywhere

    def handle(self, request: HttpRequest) -> Coroutine[Any, Any, None] | None:
        """Answer one request: route it, forward it, write the answer to the client.

        Not a coroutine itself: the common request (no body, or a small one already in,
        and an idle connection to the chosen replica) is sent here and answered by the
        replica connection's callbacks (:class:`Exchange`): no task, no future. Every
        other request, and one whose answer streams or fails, is handed back as a
        coroutine for the connection to run.
        """
        start = perf_counter()
        table = self.table
        host = request.host
        path = request.target
        authority = None
        if path[:1] != "/" or request.method in REFUSED_METHODS or "/." in path or "%" in path:
            # Rare: another target form, a method we answer, or dot-segments to resolve.
            checked = self._request_target(request, path)
            if isinstance(checked, Answer):
                return self._write(request, checked)
            path, authority = checked
            if authority is not None:
                host = authority
        colon = host.find(":")
        if colon >= 0:
            host = host[:colon]
        target = table.by_host.get(host) or table.by_host.get(host.lower())
        if target is None:
            if not path.startswith(PATH_FORM_PREFIX):
                return self._write(
                    request,
                    self._unrouted(
                        request, 404, f"no model endpoint or version endpoint at host {host!r}"
                    ),
                )
            target, path = self._path_form(table, path)
            if target is None:
                return self._write(
                    request,
                    self._unrouted(
                        request, 404, f"no model endpoint or version endpoint at {path!r}"
                    ),
                )
        if target.grpc:
            return self._write(request, self._wrong_protocol(request, target))
        version, chosen, policy, mirror = choose_version(target, request.headers)
        query = path.find("?")
        kind = target.rewrites.get(path if query < 0 else path[:query])
        original = path
        if kind is not None:
            path = version.rewritten[kind] if query < 0 else version.rewritten[kind] + path[query:]
        if mirror is None:
            if self._send_now(request, version, chosen, policy, path, authority, start):
                return None
            work = self._forward(request, version, policy, path, authority=authority)
        else:
            mirror_path = original
            if kind is not None:
                mirror_path = mirror.version.rewritten[kind] + (
                    path[path.find("?") :] if query >= 0 else ""
                )
            if self._send_now(
                request, version, chosen, policy, path, authority, start, mirror, mirror_path
            ):
                return None
            work = self._mirrored(request, version, policy, path, mirror, mirror_path, authority)
        return self._complete(request, version, chosen, start, work)

    async def _complete(
        self,
        request: HttpRequest,
        version: VersionTarget,
        chosen: int,
        start: float,
        work: Awaitable[Answer],
    ) -> None:
        """Await the answer from ``version``, count it, and write it to the client."""
        stats = version.stats
        try:
            resp = await work
        except (ConnectionError, asyncio.CancelledError):
            # The client left; nginx's 499 says so in the metrics.
            stats.record(chosen, 499, perf_counter() - start)
            raise
        except Exception:
            if request.answer_started:
                raise
            log.exception("unexpected error answering %s %s", request.method, request.target)
            resp = self._error(request, 500, "internal gateway error", close=True)
        finally:
            stats.in_flight -= 1
        stats.record(chosen, resp.status, perf_counter() - start)
        await self._write(request, resp)

    def _send_now(
        self,
        request: HttpRequest,
        version: VersionTarget,
        chosen: int,
        policy: RoutePolicy,
        path: str,
        authority: str | None,
        start: float,
        mirror: MirrorTarget | None = None,
        mirror_path: str = "",
    ) -> bool:
        """Send the request at once, if it is the common one: its body (if any) in and
        small, a replica of ``version`` free and an idle connection to it. Its answer
        then comes through the connection's callbacks (:class:`Exchange`). With a
        ``mirror``, its copy goes out first."""
        received = request.body
        if received is not None and (
            request.chunked
            or not received.eof
            or (request.content_length or 0) > self.limits.buffer_body_bytes
        ):
            return False
        upstreams = version.upstreams
        if not upstreams:
            return False
        limit = version.limit
        up = choose(upstreams) if not limit else choose_free(upstreams, limit)
        if up is None:
            return False
        conn = self.pool.take_idle(up)
        if conn is None:
            return False
        up.outstanding += 1
        body = b"" if received is None else received.take()
        head, request_id = self._request_head(request, path, False, authority)
        exchange = Exchange(self, request, version, chosen, policy, up, conn, head, body)
        exchange.request_id = request_id
        exchange.start = exchange.dispatched = start
        if mirror is not None:
            exchange.copy = self.mirroring.launch(
                mirror, self._copy_head(request, head, mirror_path), body, policy.timeout
            )
        conn.begin(head + body if body else head, request.method == "HEAD", policy.timeout)
        request.on_gone = exchange.gone
        if conn.error is not None:
            exchange.hand_over()
        else:
            conn.listener = exchange.progress
        return True

    async def _write(self, request: HttpRequest, answer: Answer) -> None:
        """Send an answer made whole (a streamed one is out already)."""
        if answer.close:
            request.keep_alive = False
        conn = request.conn
        if answer.data:
            conn.write(answer.data)
        # Honour backpressure: a client that pipelines and never reads must not make us
        # buffer without bound (no wait unless the transport paused writing).
        if conn.write_paused:
            await conn.drain()

    def _request_target(self, request: HttpRequest, path: str) -> tuple[str, str | None] | Answer:
        """The origin-form path to route and forward, and the authority an absolute-form
        target names; or the gateway's own answer."""
        method = request.method
        if method in REFUSED_METHODS:
            self.metrics.count_unrouted(405)
            # After a CONNECT the client sends tunnel bytes, not requests: close.
            return self._error(
                request,
                405,
                f"{method} is not served by this gateway",
                headers=[("Allow", FORWARDED_METHODS)],
                close=method == "CONNECT",
            )
        authority = None
        if path[0] != "/":
            if path == "*":
                return self._unrouted(
                    request, 400, "OPTIONS * is not served: ask a model endpoint's URL"
                )
            split = _absolute_form(path)
            if split is None:
                return self._unrouted(
                    request, 400, f"request target {path[:100]!r} is not a path or an http URL"
                )
            authority, path = split
        if "/." in path or "%" in path:
            resolved = _resolve_dot_segments(path)
            if resolved is None:
                return self._unrouted(request, 400, "request path climbs above the root")
            path = resolved
        return path, authority

    def _path_form(
        self, table: RouteTable, path: str
    ) -> tuple[ModelTarget | VersionTarget | None, str]:
        # /serving/<project>/<model or model-version>/<rest> → /<rest>
        parts = path[len(PATH_FORM_PREFIX) :].split("/", 2)
        if len(parts) < 2:
            return None, path
        name = parts[1].partition("?")[0]
        target = table.by_path.get(f"{parts[0]}/{name}")
        rest = parts[2] if len(parts) == 3 else ""
        if len(parts) == 2 and "?" in parts[1]:
            rest = "?" + parts[1].partition("?")[2]
        return target, "/" + rest

    async def _mirrored(
        self,
        request: HttpRequest,
        version: VersionTarget,
        policy: RoutePolicy,
        path: str,
        mirror: MirrorTarget,
        mirror_path: str,
        authority: str | None,
    ) -> Answer:
        """The primary exchange, with a copy sent to the mirror version beside it."""
        body: bytes | None = b""
        received = request.body
        if received is not None:
            length = request.content_length
            if (
                not request.chunked
                and length is not None
                and length <= self.limits.buffer_body_bytes
            ):
                request.continue_if_expected()
                try:
                    body = received.take() if received.eof else await received.read_all()
                except BadBody as exc:
                    return self._bad_body(request, exc)
            else:
                body = None  # streams: can't be copied, counted as dropped
        if body is None:
            head = None
            copy = self.mirroring.launch(mirror, b"", None, policy.timeout)
        else:
            head = self._request_head(request, path, False, authority)
            copy_head = self._copy_head(request, head[0], mirror_path)
            copy = self.mirroring.launch(mirror, copy_head, body, policy.timeout)
        work = self._forward(request, version, policy, path, body, head, authority)
        return await (work if copy is None else _with_copy(copy, work))

    def _copy_head(self, request: HttpRequest, head: bytes, mirror_path: str) -> bytes:
        """The copy's head: the primary's with its own request line and a marker (the
        replica-facing header keeps its name)."""
        line_end = head.index(b"\r\n") + 2
        return (
            f"{request.method} {mirror_path} HTTP/1.1\r\n".encode("latin-1")
            + head[line_end:-2]
            + b"X-Shadow-Request: 1\r\n\r\n"
        )

    def _bad_body(self, request: HttpRequest, exc: BadBody) -> Answer:
        """A body whose framing broke after its head came (a bad chunk): the
        connection's answer to the bytes, and then it closes."""
        request.keep_alive = False
        return Answer(400, exc.answer, None, True)

    def _unrouted(
        self, request: HttpRequest, status: int, message: str, code: str | None = None
    ) -> Answer:
        self.metrics.count_unrouted(status)
        return self._error(request, status, message, code=code)

    def _wrong_protocol(self, request: HttpRequest, target: Target) -> Answer:
        where = (
            f"the gateway's gRPC port ({self.grpc_port})"
            if self.grpc_port is not None
            else "a gateway's gRPC port (this one serves none: --grpc-port)"
        )
        return self._unrouted(
            request,
            WRONG_PROTOCOL,
            f"{describe(target)} serves UPI_V1 (gRPC); call it over gRPC on {where}",
            code="wrong_protocol",
        )

    def _error(
        self,
        request: HttpRequest,
        status: int,
        message: str,
        *,
        request_id: bytes | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: list[tuple[str, str]] | None = None,
        close: bool = False,
    ) -> Answer:
        """The gateway's own answer: its JSON error, with the request's ``X-Request-Id``
        (the client's, or the one the replica was sent, or a new one) as on any answer."""
        if request_id is None:
            request_id = request.request_id or self.request_ids.next()
        if retry_after is not None:
            headers = [*(headers or ()), ("Retry-After", str(retry_after))]
        return error_answer(
            status,
            message,
            request_id=request_id,
            code=code,
            headers=headers,
            close=close,
            http10=request.http10,
            keep_alive=request.keep_alive,
        )

    # --- forwarding: the body policy, activation, the exchange with retries ---------

    def _forward(
        self,
        request: HttpRequest,
        version: VersionTarget,
        policy: RoutePolicy,
        path: str,
        preread: bytes | None = None,
        prebuilt: tuple[bytes, bytes] | None = None,
        authority: str | None = None,
    ) -> Awaitable[Answer]:
        """The answer to ``request`` from ``version``, to be awaited, by the body policy.

        A body framed in a way that can't go on, or over the size limit, is refused; a
        small one is read whole (one write with the head, and replayable); a larger or
        chunked one streams. ``Expect: 100-continue`` is answered first for a body not
        read yet; ``preread`` is a body :meth:`_mirrored` has read already, ``prebuilt``
        its head.

        Not a coroutine itself: when the body is in hand (or there is none) and the
        version has a replica, as nearly always, it hands back :meth:`_send`'s coroutine,
        so a request awaits no more than the exchange. A body still on its way
        (:meth:`_read_then_forward`) and a version without a replica
        (:meth:`_activate_then_send`) are waited for first.
        """
        body: bytes | None = b""  # None: the body streams and can't be replayed
        chunked = False
        received = request.body
        if received is not None:
            length = request.content_length
            if request.chunked:
                refused = _unforwardable_framing(request)
                if refused is not None:
                    return _answered(self._error(request, refused[0], refused[1], close=True))
                if preread is None:
                    request.continue_if_expected()
                chunked = True
                body = None
            elif length is None:
                body = b""  # llhttp: no length and not chunked is no body
            elif length > self.limits.max_body_bytes:
                return _answered(self._too_large(request, length))
            elif preread is not None:
                body = preread
            else:
                request.continue_if_expected()
                if length > self.limits.buffer_body_bytes:
                    body = None
                elif not received.eof:
                    return self._read_then_forward(request, version, policy, path, authority)
                else:
                    # Small bodies have usually arrived with the head: take them as they are.
                    body = received.take()
        head, request_id = prebuilt or self._request_head(request, path, chunked, authority)
        if not version.upstreams:
            return self._activate_then_send(
                request, version, policy, head, body, chunked, request_id
            )
        return self._send(request, version, policy, head, body, chunked, request_id)

    def _too_large(self, request: HttpRequest, length: int) -> Answer:
        limit = self.limits.max_body_bytes
        return self._error(
            request,
            413,
            f"request body of {length} bytes is over the limit of {limit} bytes",
            close=True,
        )

    async def _read_then_forward(
        self,
        request: HttpRequest,
        version: VersionTarget,
        policy: RoutePolicy,
        path: str,
        authority: str | None,
    ) -> Answer:
        """:meth:`_forward`, once a body small enough to buffer has all arrived."""
        assert request.body is not None
        try:
            body = await request.body.read_all()
        except BadBody as exc:
            return self._bad_body(request, exc)
        return await self._forward(request, version, policy, path, body, None, authority)

    async def _activate_then_send(
        self,
        request: HttpRequest,
        version: VersionTarget,
        policy: RoutePolicy,
        head: bytes,
        body: bytes | None,
        chunked: bool,
        request_id: bytes,
    ) -> Answer:
        """The exchange for a version without a ready replica: the request waits while
        the version starts from zero, if its route allows that; else 503."""
        refused = None
        if version.scale_to_zero and self.activator is not None:
            try:
                version = await self.activator.activate(version)
            except ActivationRefused as exc:
                refused = str(exc)
        if refused is None and version.upstreams:
            return await self._send(request, version, policy, head, body, chunked, request_id)
        return self._unavailable(
            request,
            version,
            refused
            or f"version endpoint {version.project}/{version.full_name} has no ready replica",
            request_id,
        )

    def _unavailable(
        self, request: HttpRequest, version: VersionTarget, message: str, request_id: bytes
    ) -> Answer:
        """503 with Retry-After: nothing can serve the request now, try again soon."""
        return self._error(
            request,
            503,
            message,
            request_id=request_id,
            retry_after=1,
            headers=[("X-Model-Version", version.version_header)],
        )

    async def _send(
        self,
        request: HttpRequest,
        version: VersionTarget,
        policy: RoutePolicy,
        head: bytes,
        body: bytes | None,
        chunked: bool,
        request_id: bytes,
        begun: Exchange | None = None,
    ) -> Answer:
        """The exchange with a replica of ``version``, and another after a failure, as
        far as the route's retries allow and the request can be sent again.

        A request is sent again when its body was read whole and its method or route is
        idempotent, or when the replica provably never read it. A pooled connection the
        replica had closed costs a free retry on a fresh one; each replica tried is left
        out of the next choice.

        The replica's slot (its ``outstanding`` count) is taken when it is chosen; with a
        concurrency limit only a replica with a free slot is chosen, and when there is
        none the request waits in the version's queue (a retry too). ``begun``: an
        exchange :meth:`_send_now` started, whose answer streams or failed.
        """
        upstreams = version.upstreams
        pool = self.pool
        ustats = self.upstream_stats
        stats = version.stats
        replayable = body is not None and (policy.idempotent or request.method in SAFE_METHODS)
        tried: list[Upstream] | None = None
        failure: UpstreamError | None = None
        retries_left = policy.retries
        stale_retry = body is not None  # one free retry after a dead pooled connection
        limit = version.limit
        # Whoever chooses a replica takes its slot (``outstanding``); the queue hands
        # over slots already taken.
        if begun is not None:
            up: Upstream | None = begun.up  # its slot taken already
        elif (up := choose(upstreams) if not limit else choose_free(upstreams, limit)) is not None:
            up.outstanding += 1
        elif limit and self.activator is not None:
            try:
                up = await self.activator.wait_for_slot(version)
            except ActivationRefused as exc:
                return self._unavailable(request, version, str(exc), request_id)
        fresh = False
        while up is not None:
            if begun is not None:
                conn: UpstreamConnection | None = begun.conn
            else:
                conn = None if fresh else pool.take_idle(up)
            fresh = False
            if conn is None:
                try:
                    conn = await pool.connect(up)
                except UpstreamError as exc:
                    # The slot goes back but not to the queue: a replica that can't be
                    # reached would fail whoever it was handed to.
                    up.outstanding -= 1
                    up.record_failure()
                    ustats.error(exc.kind)
                    failure = exc
                    if retries_left == 0:
                        break
                    retries_left -= 1
                    ustats.retries += 1
                    tried = [up] if tried is None else [*tried, up]
                    up = await self._retry_slot(version, tried)
                    continue
            used = up
            dispatched = perf_counter() if begun is None else begun.dispatched
            stale = False  # the same replica again, on the slot it has
            resumed = begun is not None
            begun = None
            try:
                return await self._exchange(
                    request, used, conn, head, body, chunked, version, policy, request_id, resumed
                )
            except ClientSideError as exc:
                return self._error(request, exc.status, str(exc), request_id=request_id, close=True)
            except UpstreamError as exc:
                if exc.unread and stale_retry and conn.reused:
                    # A pooled connection the replica had already closed: nothing reached
                    # it, and a fresh connection to the same replica will likely work.
                    stale_retry = False
                    fresh = stale = True
                    ustats.retries += 1
                else:
                    # Noted before the slot is given back: a replica ejected now is not
                    # handed to whoever waits for the slot.
                    ustats.error(exc.kind)
                    up.record_failure()
                    failure = exc
            finally:
                if not stale:
                    stats.served += 1
                    stats.service_seconds += perf_counter() - dispatched
                    used.release()
            # After a failure only (the loop goes on out here: the compiled hot path can't
            # continue or break inside try/finally).
            if stale:
                continue
            assert failure is not None
            if failure.kind == "timeout":
                return self._timed_out(request, version, policy, request_id)
            if not (replayable or (failure.unread and body is not None)) or retries_left == 0:
                break
            retries_left -= 1
            ustats.retries += 1
            tried = [up] if tried is None else [*tried, up]
            # A retry, its slot taken only now that the failed one's is given back.
            up = await self._retry_slot(version, tried)
        return self._error(
            request,
            502,
            f"version endpoint {version.full_name} failed: {_client_reason(failure)}",
            request_id=request_id,
            headers=[("X-Model-Version", version.version_header)],
        )

    async def _retry_slot(
        self, version: VersionTarget, tried: list[Upstream] | None
    ) -> Upstream | None:
        """A replica not tried yet for a retry, its slot taken; with a concurrency limit
        and none free, the first slot the version's queue hands over (any replica).
        None: no replica left, or the queue refused."""
        up = choose_free(version.upstreams, version.limit, tried)
        if up is not None:
            up.outstanding += 1
            return up
        if version.limit and version.upstreams and self.activator is not None:
            with contextlib.suppress(ActivationRefused):
                return await self.activator.wait_for_slot(version)
        return None

    def _timed_out(
        self, request: HttpRequest, version: VersionTarget, policy: RoutePolicy, request_id: bytes
    ) -> Answer:
        """504: the replica was silent for the route's whole timeout."""
        return self._error(
            request,
            504,
            f"version endpoint {version.full_name} did not answer within {policy.timeout:g} s",
            request_id=request_id,
            headers=[("X-Model-Version", version.version_header)],
        )

    def _request_head(
        self, request: HttpRequest, path: str, chunked: bool, authority: str | None = None
    ) -> tuple[bytes, bytes]:
        """The head sent to the replica, and the request's id (the client's, or new)."""
        if not request.hop and authority is None:
            # Nothing to drop or change (the connection saw no such header): the lines go
            # on as they came, joined in C.
            start = f"{request.method} {path} HTTP/1.1\r\n".encode("latin-1")
            request_id = request.request_id
            ours = b"\r\nX-Forwarded-For: " + request.peer
            if request_id is None:
                request_id = self.request_ids.next()
                ours += b"\r\nX-Request-Id: " + request_id
            if chunked:
                ours += b"\r\nTransfer-Encoding: chunked"
            raw = request.raw
            if not raw:
                return start + ours[2:] + b"\r\n\r\n", request_id
            return start + b"\r\n".join(map(b": ".join, raw)) + ours + b"\r\n\r\n", request_id
        lines = [f"{request.method} {path} HTTP/1.1\r\n".encode("latin-1")]
        append = lines.append
        forwarded_for = request_id = connection = None
        for name, value in request.raw:
            lname = name.lower()
            if lname in REQUEST_HOP_BY_HOP:
                if lname == b"connection":
                    connection = value if connection is None else connection + b"," + value
                continue
            if lname == b"x-forwarded-for":
                forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
                continue
            if lname == b"x-request-id":
                request_id = value
            append(name + b": " + value + b"\r\n")
        if connection is not None and connection.lower() not in PLAIN_CONNECTION:
            lines = [lines[0], *without_named(lines[1:], connection)]
            append = lines.append
        if authority is not None:
            # An absolute-form target's authority is the request's host (RFC 9112 §3.2.2).
            lines = [line for line in lines if line[:5].lower() != b"host:"]
            append = lines.append
            append(b"Host: " + authority.encode("latin-1") + b"\r\n")
        peer = request.peer
        append(
            b"X-Forwarded-For: " + forwarded_for + b", " + peer + b"\r\n"
            if forwarded_for
            else b"X-Forwarded-For: " + peer + b"\r\n"
        )
        if request_id is None:
            request_id = self.request_ids.next()
            append(b"X-Request-Id: " + request_id + b"\r\n")
        if chunked:
            append(b"Transfer-Encoding: chunked\r\n")
        append(b"\r\n")
        return b"".join(lines), request_id

    async def _exchange(
        self,
        request: HttpRequest,
        up: Upstream,
        conn: UpstreamConnection,
        head: bytes,
        body: bytes | None,
        chunked: bool,
        version: VersionTarget,
        policy: RoutePolicy,
        request_id: bytes,
        begun: bool = False,
    ) -> Answer:
        no_body = request.method == "HEAD"
        sender: asyncio.Future[None] | None = None
        if begun:
            pass  # sent by _send_now
        elif body is None:
            # Full duplex: a replica may answer (and stream) before the upload ends.
            conn.begin(head, no_body, policy.timeout, body_sent=False)
            sender = asyncio.ensure_future(self._send_body(request, conn, chunked, conn.exchange))
        else:
            conn.begin(head + body if body else head, no_body, policy.timeout)
        exchange = conn.exchange
        try:
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
            status = conn.status
            if conn.complete:
                chunks = conn.take_chunks()
                payload = chunks[0] if len(chunks) == 1 else (b"".join(chunks) if chunks else b"")
                self._settle(up, conn, status)
                return relay(
                    status,
                    conn.kept,
                    conn.length,
                    conn.connection,
                    payload,
                    version.relay_headers + b"X-Request-Id: " + request_id + b"\r\n",
                    request.keep_alive,
                    no_body,
                    request.http10,
                )
            extra = version.relay_headers + b"X-Request-Id: " + request_id + b"\r\n"
            return await self._stream_response(request, up, conn, status, extra, no_body)
        except BaseException:
            # Failed, or cancelled because the client left: the connection can't be reused.
            if conn.exchange == exchange and not conn.complete:
                conn.abort()
            raise
        finally:
            if conn.exchange == exchange:
                conn.finish()
            if sender is not None:
                if sender.done():
                    if not sender.cancelled():
                        sender.exception()  # retrieved: reported through conn.error
                else:
                    sender.cancel()

    def _settle(self, up: Upstream, conn: UpstreamConnection, status: int) -> None:
        """The exchange is over: off the clock, health noted, connection back to the pool."""
        conn.finish()
        if status >= 500:
            up.record_failure()
        elif up.failures:  # the common case skips the call
            up.record_success()
        self.pool.release(conn)

    async def _send_body(
        self, request: HttpRequest, conn: UpstreamConnection, chunked: bool, exchange: int
    ) -> None:
        received = request.body
        assert received is not None
        limit = self.limits.max_body_bytes
        total = 0
        try:
            while True:
                conn.awaiting_client = True
                try:
                    chunk = await received.read_any()
                finally:
                    conn.awaiting_client = False
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise ClientSideError(413, f"request body is over the limit of {limit} bytes")
                if conn.error is not None or conn.complete or conn.exchange != exchange:
                    return  # the exchange ended without the rest of the body
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if conn.write_paused:
                    await conn.drain()
            if conn.exchange == exchange and conn.error is None:
                if chunked:
                    conn.write(b"0\r\n\r\n")
                conn.body_sent = True
        except ClientSideError as exc:
            if conn.exchange == exchange:
                conn.fail(exc)
        except BadBody:
            if conn.exchange == exchange:
                conn.fail(ClientSideError(400, "malformed request body: a bad chunk"))
        except ConnectionError as exc:
            if conn.exchange == exchange:
                conn.fail(ClientSideError(499, f"the client went away mid-upload: {exc}"))
        except asyncio.CancelledError:
            if conn.exchange == exchange and not conn.complete:
                conn.fail(ClientSideError(499, "the request ended before its body was sent"))
            raise

    async def _stream_response(
        self,
        request: HttpRequest,
        up: Upstream,
        conn: UpstreamConnection,
        status: int,
        extra: bytes,
        no_body: bool,
    ) -> Answer:
        head, chunked, keep_alive = streamed_head(
            status,
            conn.kept,
            conn.length,
            conn.connection,
            extra,
            request.keep_alive,
            request.http10,
            no_body,
        )
        request.keep_alive = keep_alive
        client = request.conn
        try:
            request.answer_started = True
            client.write(head)
            while True:
                if conn.chunks:
                    for chunk in conn.take_chunks():
                        if chunked:
                            client.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        else:
                            client.write(chunk)
                    if client.write_paused:
                        await client.drain()
                    continue
                if conn.complete:
                    break
                error = conn.error
                if error is not None:
                    # Headers are out: the only honest signal left is a cut connection.
                    if not isinstance(error, ClientSideError):
                        up.record_failure()
                        self.upstream_stats.error(error.kind)
                    client.abort()
                    raise ClientGone(str(error))
                await conn.wait()
            if chunked:
                client.write(b"0\r\n\r\n")
        except BaseException:
            conn.abort()
            raise
        # Only now can the connection serve another exchange.
        self._settle(up, conn, status)
        return Answer(status, b"", None, not keep_alive)


def _absolute_form(target: str) -> tuple[str, str] | None:
    """An http(s) absolute-form target as (authority, origin-form path): None for other
    schemes, userinfo (RFC 9110 §4.2.4: an error) or an empty host."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    end = len(rest)
    for stop in "/?#":
        at = rest.find(stop)
        if 0 <= at < end:
            end = at
    authority, path = rest[:end], rest[end:]
    if not authority or "@" in authority:
        return None
    return authority, path if path.startswith("/") else "/" + path


def _resolve_dot_segments(path: str) -> str | None:
    """``path`` with its ``.`` and ``..`` segments resolved (RFC 3986 §5.2.4), a
    percent-encoded dot counting as a dot (as the replica's URL library may decode it),
    the query left alone; None when ``..`` climbs above the root (nginx: 400)."""
    query = path.find("?")
    rest = "" if query < 0 else path[query:]
    segments = (path if query < 0 else path[:query]).split("/")[1:]
    kept: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        dots = segment.lower().replace("%2e", ".") if "%" in segment else segment
        if dots == "..":
            if not kept:
                return None
            kept.pop()
        elif dots != ".":
            kept.append(segment)
            continue
        if i == last:
            kept.append("")  # "/a/b/.." is "/a/", a directory
    return "/" + "/".join(kept) + rest


def _unforwardable_framing(request: HttpRequest) -> tuple[int, str] | None:
    """Why a body framed by Transfer-Encoding can't go on, if it can't (RFC 9112 §6.1):
    HTTP/1.0 has no transfer codings (nginx: 400), and any coding but ``chunked`` would
    reach the replica undone while our ``Transfer-Encoding: chunked`` no longer names it
    (nginx: 501). llhttp has already refused a coding list that doesn't end in chunked."""
    if request.http10:
        return 400, "Transfer-Encoding in an HTTP/1.0 request"
    coding = (request.transfer_encoding or b"").decode("latin-1")
    if coding.lower() != "chunked":
        return 501, f"transfer coding {coding[:100]!r} is not implemented: only chunked is"
    return None


def _client_reason(failure: UpstreamError | None) -> str:
    """What a client is told: the kind of failure, not our replicas' addresses."""
    if failure is None:
        return "no replica left to try"
    return {
        "connect": "no replica could be reached",
        "reset": "the replica closed the connection before answering",
        "protocol": "the replica's answer was not valid HTTP",
    }.get(failure.kind, failure.kind)


async def _answered(resp: Answer) -> Answer:
    """An answer already made, as the awaitable :meth:`Proxy._forward` hands back."""
    return resp


class Exchange:
    """A request :meth:`Proxy._send_now` sent, answered by the replica connection's
    callbacks: when the answer is whole it is relayed, counted and written here. An
    answer that streams, or an exchange that fails (to be retried, or answered with
    an error), goes on in :meth:`Proxy._send` as a coroutine, where it left off."""

    __slots__ = (
        "body",
        "chosen",
        "conn",
        "copy",
        "dispatched",
        "head",
        "policy",
        "proxy",
        "request",
        "request_id",
        "start",
        "up",
        "version",
    )

    def __init__(
        self,
        proxy: Proxy,
        request: HttpRequest,
        version: VersionTarget,
        chosen: int,
        policy: RoutePolicy,
        up: Upstream,
        conn: UpstreamConnection,
        head: bytes,
        body: bytes,
    ) -> None:
        self.proxy = proxy
        self.request = request
        self.version = version
        self.chosen = chosen
        self.policy = policy
        self.up = up
        self.conn = conn
        self.head = head
        self.body = body
        self.request_id = b""
        self.start = self.dispatched = 0.0
        self.copy: MirrorCopy | None = None  # a mirrored copy, told the primary's answer

    def progress(self) -> None:
        """The replica connection's listener: called after each read that changed it."""
        conn = self.conn
        if conn.complete:
            self._answer()
        elif conn.error is not None or conn.head_done:
            self.hand_over()

    def _answer(self) -> None:
        conn = self.conn
        conn.listener = None
        request = self.request
        request.on_gone = None
        version = self.version
        stats = version.stats
        status = conn.status
        chunks = conn.take_chunks()
        payload = chunks[0] if len(chunks) == 1 else (b"".join(chunks) if chunks else b"")
        answer = relay(
            status,
            conn.kept,
            conn.length,
            conn.connection,
            payload,
            version.relay_headers + b"X-Request-Id: " + self.request_id + b"\r\n",
            request.keep_alive,
            request.method == "HEAD",
            request.http10,
        )
        up = self.up
        self.proxy._settle(up, conn, status)
        end = perf_counter()
        stats.served += 1
        stats.service_seconds += end - self.dispatched
        up.release()
        stats.in_flight -= 1
        stats.record(self.chosen, status, end - self.start)
        if self.copy is not None:
            self.copy.primary_done(status, payload)
        if answer.close:
            request.keep_alive = False
        client = request.conn
        client.write(answer.data)
        client.answered(request)

    def hand_over(self) -> None:
        """The answer streams, or the exchange failed: :meth:`Proxy._send` goes on."""
        self.conn.listener = None
        request = self.request
        request.on_gone = None
        proxy = self.proxy
        work = proxy._send(
            request,
            self.version,
            self.policy,
            self.head,
            self.body,
            False,
            self.request_id,
            begun=self,
        )
        if self.copy is not None:
            work = _with_copy(self.copy, work)
        request.conn.follow(proxy._complete(request, self.version, self.chosen, self.start, work))

    def gone(self) -> None:
        """The client left before the answer: stop the exchange, give the slot back."""
        conn = self.conn
        conn.listener = None
        if not conn.complete:
            conn.abort()
        conn.finish()
        stats = self.version.stats
        end = perf_counter()
        stats.served += 1
        stats.service_seconds += end - self.dispatched
        self.up.release()
        stats.in_flight -= 1
        stats.record(self.chosen, 499, end - self.start)
        if self.copy is not None:
            self.copy.primary_done(-1, None)


async def _with_copy(copy: MirrorCopy, work: Awaitable[Answer]) -> Answer:
    """The primary's answer, told to its mirrored copy (-1: it never came)."""
    try:
        resp = await work
    except BaseException:
        copy.primary_done(-1, None)
        raise
    copy.primary_done(resp.status, resp.body)
    return resp
