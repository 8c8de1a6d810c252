"""Replicas as the gateway sees them, whatever the protocol: address, load and health.

Each :class:`Upstream` is one replica address: the count of requests outstanding on it
(for least-outstanding choice), its passive outlier-ejection state, and whether it is
draining. Upstreams outlive route tables: the :class:`UpstreamRegistry` hands the same
object to every table that names the address, so counts and health carry across a table
swap, and an address that leaves the table drains (no new requests; the pools let go of
its connections).

The connections themselves are kept by one pool per protocol, keyed by the Upstream:
:mod:`merlin_dp.gateway.pool.http1` and :mod:`merlin_dp.gateway.pool.h2`. What every
pool shares is here: the errors an exchange with a replica ends in, the pool settings,
the worker's upstream counters and :func:`connect_to`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, fields
from typing import Protocol, TypeVar

from merlin_dp.common.aio import raise_if_cancelling


class UpstreamError(Exception):
    """An exchange with a replica failed; ``kind`` names how, for metrics and retry.

    ``unread`` marks a reset that proves the replica never read the request: the kernel
    answers with RST, before any response byte, only when the replica's socket is gone
    or is closed with our bytes still unread (a replica that read the request and then
    died closes with FIN instead). Such a request is safe to send elsewhere.
    """

    def __init__(self, kind: str, message: str, unread: bool = False) -> None:
        super().__init__(message)
        self.kind = kind  # connect | reset | protocol | timeout | full (h2) | client
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
    """Replica health and connection pool settings: one value from the command line, read
    by the replicas (ejection) and by each protocol's pool."""

    # Idle HTTP/1.1 connections kept per replica.
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
    # A replica's HTTP/1.1 response head (with any 1xx heads before it) is refused 502 past
    # these, and its connection dropped: without a bound, a replica streaming one endless
    # header grows the parser's buffer until the gateway runs out of memory. Envoy's
    # defaults (60 KiB, 100 headers) in round numbers; nginx's proxy_buffer_size (4-8 KiB)
    # is tighter than model servers' heads need.
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100

    def __reduce__(self) -> tuple[type[PoolLimits], tuple[object, ...]]:
        # Pickled to worker processes; compiled, a frozen dataclass is rebuilt only
        # through its constructor (unpickling would set its fields one by one).
        return (PoolLimits, tuple(getattr(self, f.name) for f in fields(self)))


class UpstreamStats:
    """Gateway-wide upstream counters, shared by every Upstream and pool (one worker)."""

    __slots__ = ("connects", "ejections", "errors", "retries")

    def __init__(self) -> None:
        self.connects = 0
        self.ejections = 0
        self.retries = 0
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class Upstream:
    """One replica address: its load and health, whatever protocol reaches it."""

    __slots__ = (
        "address",
        "draining",
        "ejected",
        "ejections",
        "failures",
        "host",
        "limits",
        "loop",
        "outstanding",
        "port",
        "queue",
        "stats",
    )

    def __init__(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        limits: PoolLimits,
        stats: UpstreamStats,
    ) -> None:
        self.host = host
        self.port = port
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.loop = loop
        self.limits = limits
        self.stats = stats
        self.outstanding = 0
        self.failures = 0  # consecutive connect errors, resets and 5xx
        self.ejected = False
        self.ejections = 0  # consecutive ejections, for the back-off
        self.draining = False  # out of every table: no new requests
        # Its version's queue when the version has a concurrency limit (set on each table
        # swap): a request that ends here hands its slot to the first one waiting.
        self.queue: SlotQueue | None = None

    def release(self) -> None:
        """A request left this replica: its slot goes to the first request waiting for
        one, if the version has a limit and a queue."""
        self.outstanding -= 1
        queue = self.queue
        if queue is not None and queue.waiters:
            queue.hand_over(self)

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


class SlotQueue(Protocol):
    """What a replica needs of its version's queue (merlin_dp.gateway.activation)."""

    @property
    def waiters(self) -> Sized: ...

    def hand_over(self, up: Upstream) -> None: ...


_P = TypeVar("_P", bound=asyncio.BaseProtocol)


async def connect_to(up: Upstream, protocol: Callable[[], _P], limit_s: float) -> _P:
    """A connection to the replica within ``limit_s``; UpstreamError("connect") if not.
    Shared by every protocol's pool."""
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


# Told of each Upstream that leaves rotation, so a pool can let go of its connections.
DrainListener = Callable[[Upstream], None]


class UpstreamRegistry:
    """The one Upstream object per address, shared by every route table that names it.

    Pools that keep connections to a replica register a :data:`DrainListener` with
    :meth:`on_drain`; it is called once for each Upstream that drains.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: PoolLimits) -> None:
        self._loop = loop
        self._limits = limits
        self._by_address: dict[tuple[str, int], Upstream] = {}
        self._drain_listeners: list[DrainListener] = []
        self.stats = UpstreamStats()

    def on_drain(self, listener: DrainListener) -> None:
        self._drain_listeners.append(listener)

    def get(self, host: str, port: int) -> Upstream:
        key = (host, port)
        up = self._by_address.get(key)
        if up is None or up.draining:
            up = Upstream(host, port, self._loop, self._limits, self.stats)
            self._by_address[key] = up
        return up

    def retain(self, keep: Iterable[Upstream]) -> None:
        """Drain every upstream not in ``keep`` (called after a table swap)."""
        wanted = {id(u) for u in keep}
        for key, up in list(self._by_address.items()):
            if id(up) not in wanted:
                del self._by_address[key]
                self._drain(up)

    def close(self) -> None:
        for up in self._by_address.values():
            self._drain(up)
        self._by_address.clear()

    def _drain(self, up: Upstream) -> None:
        up.draining = True
        for listener in self._drain_listeners:
            listener(up)
