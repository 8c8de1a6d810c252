"""Each version endpoint's queue: requests waiting for a replica to serve them.

A request waits here in two cases, under one bound (``max_waiting`` per version and
worker) and one deadline (``timeout``); past either the caller gets 503 with Retry-After,
never "model not ready":

- **At zero.** A version whose route entry allows ``scale_to_zero`` and that has no
  ready replica is not an error: the autoscaler is poked at once (and again every second
  while anything waits, in case a poke was lost) to start a replica. When a route table
  arrives in which the version has replicas, every waiting request goes on with the new
  table's target. How long each waited is the ``cold_start_seconds`` histogram.
- **At the limit.** A version with a concurrency limit (``container_concurrency``, as
  Knative's containerConcurrency) never has more than that many requests on one replica
  from this worker: when every ready replica is at its limit, a request waits in the
  version's FIFO (:class:`VersionQueue`) and a request ending on a replica hands its slot
  straight to the first in line. So a replica's queue is empty, dispatch-to-answer is the
  service time, and the backlog is where the autoscaler can see it (the version's
  ``queued`` count, sampled into its per-second signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter

import aiohttp

from merlin_dp.common.aio import cancel_and_wait, raise_if_cancelling
from merlin_dp.gateway.metrics import ActivationStats, GatewayMetrics
from merlin_dp.gateway.pool.upstream import Upstream
from merlin_dp.gateway.routing.balancer import choose
from merlin_dp.gateway.routing.table import RouteTable, VersionKey, VersionTarget

log = logging.getLogger("gateway")

# Tells the autoscaler a version has requests waiting at zero: (version, how many wait).
Poke = Callable[[VersionTarget, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ActivationLimits:
    max_waiting: int = 1000  # per version endpoint and worker
    timeout: float = 60.0  # seconds a request may wait for the first replica
    repoke_seconds: float = 1.0


class ActivationRefused(Exception):
    """The request can't wait any longer (queue full, deadline, version gone): 503."""


class VersionQueue:
    """Requests waiting for a free slot on a version whose ready replicas are all at its
    limit, first come first served. Every replica of the version points here
    (``Upstream.queue``), so the request ending on it hands the slot over in O(1).

    The deadline costs no timer per request: waiters are in arrival order, so one timer
    at the first one's deadline expires whoever is past theirs and re-arms for the next.
    """

    __slots__ = ("activation", "limit", "loop", "timeout", "timer", "waiters")

    def __init__(self, limit: int, activation: ActivationStats, timeout: float) -> None:
        self.limit = limit
        self.activation = activation
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        # (deadline, future): the future gets the replica whose slot it now holds
        # (already counted in its ``outstanding``), None when the version left the
        # table, or TimeoutError past its deadline.
        self.waiters: deque[tuple[float, asyncio.Future[Upstream | None]]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def join(self) -> tuple[float, asyncio.Future[Upstream | None]]:
        """A place at the end of the line."""
        entry = (self.loop.time() + self.timeout, self.loop.create_future())
        self.waiters.append(entry)
        if self.timer is None:
            self.timer = self.loop.call_at(entry[0], self._expire)
        return entry

    def _expire(self) -> None:
        self.timer = None
        waiters = self.waiters
        now = self.loop.time()
        while waiters and waiters[0][0] <= now:
            _, future = waiters.popleft()
            if not future.done():
                future.set_exception(TimeoutError())
        if waiters:
            self.timer = self.loop.call_at(waiters[0][0], self._expire)

    def hand_over(self, up: Upstream) -> None:
        """``up`` has a free slot (or several): the first in line take them."""
        waiters = self.waiters
        limit = self.limit
        while waiters and (up.outstanding < limit or not limit) and not up.draining:
            _, future = waiters.popleft()
            if future.done():
                continue  # gave up: the client left
            up.outstanding += 1
            future.set_result(up)

    def dispatch(self, upstreams: tuple[Upstream, ...]) -> None:
        """After a table swap: the free slots of the version's replicas now, least
        loaded first (new replicas take the backlog)."""
        if not upstreams:
            return
        if not self.limit:
            # The limit was lifted: everyone goes, spread as the balancer spreads them.
            while self.waiters:
                up = choose(upstreams)
                assert up is not None
                self.hand_over(up)
            return
        for up in sorted(upstreams, key=lambda u: u.outstanding):
            self.hand_over(up)

    def close(self) -> None:
        """The version left the table: whoever waits is refused."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        while self.waiters:
            _, future = self.waiters.popleft()
            if not future.done():
                future.set_result(None)


class Activator:
    def __init__(
        self, metrics: GatewayMetrics, limits: ActivationLimits, poke: Poke | None = None
    ) -> None:
        self.metrics = metrics
        self.limits = limits
        self.poke = poke
        self._waiting: dict[VersionKey, list[asyncio.Future[VersionTarget | None]]] = {}
        self._pokers: dict[VersionKey, asyncio.Task[None]] = {}
        self._queues: dict[VersionKey, VersionQueue] = {}  # versions with a limit

    def waiting(self, key: VersionKey) -> int:
        """Requests waiting for ``key`` at zero."""
        return len(self._waiting.get(key, ()))

    def queued(self, key: VersionKey) -> int:
        """Requests waiting for ``key`` in all: at zero and for a free slot."""
        queue = self._queues.get(key)
        return self.waiting(key) + (len(queue.waiters) if queue is not None else 0)

    async def wait_for_slot(self, version: VersionTarget) -> Upstream:
        """Wait in ``version``'s queue for a free slot on one of its replicas; returns the
        replica, the slot already counted in its ``outstanding``."""
        queue = self._queues.get(version.key)
        if queue is None:  # a table applied without table_swapped (tests): adopt it now
            queue = self._adopt(version)
        stats = queue.activation
        queued = self.queued(version.key)
        if queued >= self.limits.max_waiting:
            stats.overflow += 1
            raise ActivationRefused(
                f"every replica of version endpoint {version.project}/{version.full_name} is "
                f"serving its limit of {queue.limit} requests and {queued} requests already wait"
            )
        entry = queue.join()
        future = entry[1]
        stats.queued += 1
        vstats = version.stats
        vstats.queued += 1
        try:
            up = await future
        except TimeoutError:
            stats.timed_out += 1
            raise ActivationRefused(
                f"no replica of version endpoint {version.project}/{version.full_name} "
                f"had a free slot within {self.limits.timeout:g} s"
            ) from None
        except BaseException:
            # Cancelled: the client left. A slot that came meanwhile is passed on.
            if future.done() and not future.cancelled() and future.exception() is None:
                held = future.result()
                if held is not None:
                    held.outstanding -= 1
                    queue.hand_over(held)
            else:
                future.cancel()
                with contextlib.suppress(ValueError):
                    queue.waiters.remove(entry)
            raise
        finally:
            vstats.queued -= 1
        if up is None:
            stats.timed_out += 1
            raise ActivationRefused(
                f"version endpoint {version.project}/{version.full_name} was removed while "
                "requests waited for it"
            )
        return up

    def _adopt(self, version: VersionTarget) -> VersionQueue:
        queue = self._queues.get(version.key)
        if queue is None:
            activation = self.metrics.activation(*version.key)
            queue = VersionQueue(version.limit, activation, self.limits.timeout)
            self._queues[version.key] = queue
        queue.limit = version.limit
        for up in version.upstreams:
            up.queue = queue
        return queue

    async def activate(self, version: VersionTarget) -> VersionTarget:
        """Wait until ``version`` has a ready replica; returns the newer table's target."""
        key = version.key
        stats = self.metrics.activation(*key)
        waiters = self._waiting.get(key)
        if waiters is None:
            waiters = self._waiting[key] = []
        queued = self.queued(key)
        if queued >= self.limits.max_waiting:
            stats.overflow += 1
            raise ActivationRefused(
                f"version endpoint {version.project}/{version.full_name} is starting from "
                f"zero and {queued} requests already wait for it"
            )
        future: asyncio.Future[VersionTarget | None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        stats.held += 1
        vstats = version.stats
        vstats.queued += 1
        started = perf_counter()
        self._ensure_poking(version, stats)
        try:
            async with asyncio.timeout(self.limits.timeout):
                target = await future
        except TimeoutError:
            stats.timed_out += 1
            raise ActivationRefused(
                f"version endpoint {version.project}/{version.full_name} did not start "
                f"within {self.limits.timeout:g} s"
            ) from None
        finally:
            vstats.queued -= 1
            if not future.done():
                future.cancel()
            if future in waiters:
                waiters.remove(future)
            if not waiters and self._waiting.get(key) is waiters:
                del self._waiting[key]
        if target is None:
            stats.timed_out += 1
            raise ActivationRefused(
                f"version endpoint {version.project}/{version.full_name} was removed while starting"
            )
        stats.cold_start.observe(perf_counter() - started)
        return target

    def table_swapped(self, table: RouteTable) -> None:
        """Point each version's replicas at its queue and dispatch what waits for a slot;
        release whatever waits at zero for a version the new table can serve (or has
        dropped)."""
        versions = table.by_key
        for key in [k for k in self._queues if k not in versions]:
            self._queues.pop(key).close()
        for version in versions.values():
            self._requeue(version)
        if not self._waiting:
            return
        for key, waiters in list(self._waiting.items()):
            target = table.by_key.get(key)
            if target is not None and target.scale_to_zero and not target.upstreams:
                continue  # still starting
            for future in waiters:
                if not future.done():
                    future.set_result(target)

    def _requeue(self, version: VersionTarget) -> None:
        """``version`` as a new table has it: its replicas point at its queue (or at none
        without a limit), and free slots go to whoever waits."""
        if version.limit:
            queue: VersionQueue | None = self._adopt(version)
        else:
            for up in version.upstreams:
                up.queue = None
            queue = self._queues.get(version.key)
            if queue is None:
                return
            queue.limit = 0
        assert queue is not None
        if queue.waiters:
            queue.dispatch(version.upstreams)
        if not version.limit and not queue.waiters:
            del self._queues[version.key]

    def _ensure_poking(self, version: VersionTarget, stats: ActivationStats) -> None:
        key = version.key
        if self.poke is None or key in self._pokers:
            return
        self._pokers[key] = asyncio.ensure_future(self._keep_poking(version, stats))

    async def _keep_poking(self, version: VersionTarget, stats: ActivationStats) -> None:
        key = version.key
        assert self.poke is not None
        try:
            while self._waiting.get(key):
                try:
                    await self.poke(version, len(self._waiting[key]))
                    stats.pokes += 1
                except Exception as exc:  # a lost poke is retried; the deadline bounds it
                    raise_if_cancelling()
                    stats.poke_errors += 1
                    log.debug("poking the autoscaler for %s failed: %s", key, exc)
                await asyncio.sleep(self.limits.repoke_seconds)
        finally:
            self._pokers.pop(key, None)

    async def close(self) -> None:
        await cancel_and_wait(list(self._pokers.values()))


class HttpPoke:
    """Pokes over HTTP: ``POST {url}/v1/activations`` (the controller hands it on to the
    autoscaler), with the gateway's controller token when it has one."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/") + "/v1/activations"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, version: VersionTarget, waiting: int) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        body = {"project": version.project, "model": version.model,
                "version": version.version, "waiting": waiting}  # fmt: skip
        async with self._session.post(self.url, json=body, headers=self.headers) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"{self.url} answered {resp.status}: {await resp.text()}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
