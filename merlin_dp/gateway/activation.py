"""Activation: holding requests for a version endpoint that is scaled to zero.

A version whose route entry allows ``scale_to_zero`` and that has no ready replica is not
an error: its requests wait here, in a bounded queue per version, while the autoscaler is
poked at once (and again every second while anything waits, in case a poke was lost) to
start a replica. When a route table arrives in which the version has replicas, every
waiting request goes on with the new table's target. Past the queue bound, or when the
deadline passes, the caller gets 503 with Retry-After — never "model not ready".

How long each request waited is the ``cold_start_seconds`` histogram
(:class:`~merlin_dp.gateway.metrics.ActivationStats`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter

import aiohttp

from merlin_dp.common.aio import cancel_and_wait, raise_if_cancelling
from merlin_dp.gateway.metrics import ActivationStats, GatewayMetrics
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


class Activator:
    def __init__(
        self, metrics: GatewayMetrics, limits: ActivationLimits, poke: Poke | None = None
    ) -> None:
        self.metrics = metrics
        self.limits = limits
        self.poke = poke
        self._waiting: dict[VersionKey, list[asyncio.Future[VersionTarget | None]]] = {}
        self._pokers: dict[VersionKey, asyncio.Task[None]] = {}

    def waiting(self, key: VersionKey) -> int:
        return len(self._waiting.get(key, ()))

    async def activate(self, version: VersionTarget) -> VersionTarget:
        """Wait until ``version`` has a ready replica; returns the newer table's target."""
        key = version.key
        stats = self.metrics.activation(*key)
        waiters = self._waiting.get(key)
        if waiters is None:
            waiters = self._waiting[key] = []
        if len(waiters) >= self.limits.max_waiting:
            stats.overflow += 1
            raise ActivationRefused(
                f"version endpoint {version.project}/{version.full_name} is starting from "
                f"zero and {len(waiters)} requests already wait for it"
            )
        future: asyncio.Future[VersionTarget | None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        stats.held += 1
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
        """Release whatever waits for a version the new table can serve (or has dropped)."""
        if not self._waiting:
            return
        for key, waiters in list(self._waiting.items()):
            target = table.by_key.get(key)
            if target is not None and target.scale_to_zero and not target.upstreams:
                continue  # still starting
            for future in waiters:
                if not future.done():
                    future.set_result(target)

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
