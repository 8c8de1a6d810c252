"""Collecting request signals from every gateway's admin port.

Each poll asks every gateway for the seconds it closed since the last one it reported,
and adds them into per-version buckets (several gateways sum into the same second). A
gateway that stops answering simply stops contributing — its old numbers age out of the
windows rather than freezing there — and ``fresh`` says whether anyone answered lately,
so the policy can hold instead of reading silence as idleness.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import aiohttp

from autoscaler.window import SecondBuckets
from gateway.aio import raise_if_cancelling

log = logging.getLogger("autoscaler")

Key = tuple[str, str, str]


class GatewaySignals:
    def __init__(self, admin_urls: Sequence[str], horizon_s: int = 120) -> None:
        self.admin_urls = list(admin_urls)
        self.horizon = horizon_s
        self.rps: dict[Key, SecondBuckets] = {}
        self.concurrency: dict[Key, SecondBuckets] = {}
        self._since: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}  # when each gateway last answered
        self._session: aiohttp.ClientSession | None = None

    def buckets(self, key: Key) -> tuple[SecondBuckets, SecondBuckets]:
        if key not in self.rps:
            self.rps[key] = SecondBuckets(self.horizon)
            self.concurrency[key] = SecondBuckets(self.horizon)
        return self.rps[key], self.concurrency[key]

    async def poll(self, now: float) -> int:
        """Fetch new seconds from every gateway; returns how many gateways answered."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        answered = 0
        for url in self.admin_urls:
            since = self._since.get(url, 0)
            try:
                async with self._session.get(f"{url}/signals", params={"since": since}) as r:
                    records = (await r.json())["signals"]
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
                raise_if_cancelling()
                self.failures[url] = self.failures.get(url, 0) + 1
                log.debug("gateway %s gave no signals: %s", url, exc)
                continue
            answered += 1
            self.last_seen[url] = now
            for rec in records:
                rps, conc = self.buckets((rec["project"], rec["model"], rec["version"]))
                rps.add(rec["second"], rec["requests"], now)
                conc.add(rec["second"], rec["concurrency"], now)
                since = max(since, rec["second"])
            self._since[url] = since
        return answered

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
