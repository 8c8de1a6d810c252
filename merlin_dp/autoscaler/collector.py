"""Collecting request signals from every gateway: pulled from admin ports, or read from
the Redis stream gateways push to.

Either way the seconds gateways closed are added into each version's
:class:`~merlin_dp.autoscaler.window.VersionSeries` (several gateways sum into the same
second). A gateway that stops reporting simply stops
contributing — its old numbers age out of the windows rather than freezing there — and
``poll`` says how many gateways reported this time against how many are expected, so the
scaler can hold instead of reading silence as idleness.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import aiohttp

from merlin_dp.autoscaler.window import HORIZON_S, VersionSeries
from merlin_dp.common.aio import raise_if_cancelling
from merlin_dp.spec.signals import SignalRecord, add_record, merge_records, signals_stream

log = logging.getLogger("autoscaler")

Key = tuple[str, str, str]


class _Buckets:
    """Per-version series, and who reported when."""

    def __init__(self, horizon_s: int) -> None:
        self.horizon = horizon_s
        self._series: dict[Key, VersionSeries] = {}
        self.failures: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}  # when each source last reported
        # Each version's recent seconds whole (gateways summed), for rollouts to judge.
        self._seconds: dict[Key, dict[int, SignalRecord]] = {}

    def series(self, key: Key) -> VersionSeries:
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = VersionSeries(self.horizon)
        return found

    def add(self, records: Iterable[SignalRecord], now: float) -> int:
        """Add a gateway's records; returns the newest second among them (-1: none)."""
        newest = -1
        for rec in records:
            key = (rec["project"], rec["model"], rec["version"])
            self.series(key).add(rec, now)
            self._keep(key, rec)
            newest = max(newest, rec["second"])
        return newest

    def _keep(self, key: Key, rec: SignalRecord) -> None:
        seconds = self._seconds.get(key)
        if seconds is None:
            seconds = self._seconds[key] = {}
        into = seconds.get(rec["second"])
        if into is None:
            seconds[rec["second"]] = merge_records([rec])[0]  # a copy
        else:
            add_record(into, rec)
        if len(seconds) > 2 * self.horizon:
            cutoff = rec["second"] - self.horizon
            for second in [s for s in seconds if s < cutoff]:
                del seconds[second]

    def second(self, key: Key, second: int) -> SignalRecord | None:
        """One version's record of one second, summed over gateways (None: none kept)."""
        seconds = self._seconds.get(key)
        return seconds.get(second) if seconds is not None else None


class GatewaySignals(_Buckets):
    """Pulls each gateway's admin ``/signals`` for the seconds since its last answer."""

    def __init__(self, admin_urls: Sequence[str], horizon_s: int = HORIZON_S) -> None:
        super().__init__(horizon_s)
        self.admin_urls = list(admin_urls)
        self._since: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def sources(self) -> list[str]:
        return self.admin_urls

    async def poll(self, now: float) -> tuple[int, int]:
        """Fetch new seconds from every gateway: (gateways that answered, gateways)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        answered = 0
        for url in self.admin_urls:
            since = self._since.get(url, 0)
            try:
                async with self._session.get(f"{url}/signals", params={"since": since}) as r:
                    records = (await r.json())["signals"]
                newest = self.add(records, now)
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
                raise_if_cancelling()
                self.failures[url] = self.failures.get(url, 0) + 1
                log.debug("gateway %s gave no signals: %s", url, exc)
                continue
            answered += 1
            self.last_seen[url] = now
            self._since[url] = max(since, newest)
        return answered, len(self.admin_urls)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class RedisSignals(_Buckets):
    """Reads the stream gateways push to (:mod:`merlin_dp.gateway.signal_push`).

    Gateways are known by the entries they send: one that sent within ``fresh_s`` has
    answered; one silent for longer than ``forget_s`` is no longer expected (it scaled
    away). Between the two it is expected and missing, and the scaler holds.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "merlin-dp",
        horizon_s: int = HORIZON_S,
        fresh_s: float = 3.0,
        forget_s: float = 30.0,
    ) -> None:
        super().__init__(horizon_s)
        self.url = url
        self.stream = signals_stream(prefix)
        self.fresh_s = fresh_s
        self.forget_s = forget_s
        self._last_id: str | None = None
        self._client: Any = None

    @property
    def sources(self) -> list[str]:
        return sorted(self.last_seen)

    async def poll(self, now: float) -> tuple[int, int]:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        if self._client is None:
            self._client = aioredis.from_url(
                self.url, socket_connect_timeout=2.0, socket_timeout=2.0
            )
        if self._last_id is None:
            # Stream ids are milliseconds: start with what is still inside the horizon.
            self._last_id = f"{int((now - self.horizon) * 1000)}-0"
        try:
            while True:
                answer = await self._client.xread({self.stream: self._last_id}, count=1000)
                entries = answer[0][1] if answer else []
                for entry_id, fields in entries:
                    self._take(fields, now)
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if len(entries) < 1000:
                    break
        except (RedisError, OSError) as exc:
            raise_if_cancelling()
            self.failures[self.url] = self.failures.get(self.url, 0) + 1
            log.debug("reading signals from %s failed: %s", self.url, exc)
            return 0, max(1, self._expected(now))
        for sender in [s for s, t in self.last_seen.items() if now - t > self.forget_s]:
            del self.last_seen[sender]
        answered = sum(1 for t in self.last_seen.values() if now - t <= self.fresh_s)
        return answered, self._expected(now)

    def _expected(self, now: float) -> int:
        return sum(1 for t in self.last_seen.values() if now - t <= self.forget_s)

    def _take(self, fields: dict[bytes, bytes], now: float) -> None:
        try:
            sender = fields[b"sender"].decode()
            records = json.loads(fields[b"records"])
            self.add(records, now)
        except (KeyError, ValueError, TypeError) as exc:
            log.debug("a malformed signals entry was skipped: %s", exc)
            return
        self.last_seen[sender] = now

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


SignalSource = GatewaySignals | RedisSignals
