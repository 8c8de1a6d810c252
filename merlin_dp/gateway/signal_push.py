"""Pushing this worker's autoscaling signals into Redis, for gateways nobody polls.

With ``--redis`` a gateway already follows the route tables controllers publish there;
it also appends the seconds its :class:`~merlin_dp.gateway.signals.SignalRecorder` closed to one
Redis stream (``<prefix>:signals``), once a second. An autoscaler reading that stream
(:class:`merlin_dp.autoscaler.collector.RedisSignals`) needs no list of gateway addresses, so
gateway replicas can come and go. Each entry names its sender (host and pid), so the
reader can tell how many gateways report. Redis being away costs nothing but the seconds
that fall out of the recorder's history meanwhile; pushing resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket

from merlin_dp.common.aio import raise_if_cancelling
from merlin_dp.gateway.signals import SignalRecorder
from merlin_dp.spec.signals import signals_stream

log = logging.getLogger("gateway")

STREAM_MAXLEN = 20_000  # about a minute of entries from 300 gateway workers


class RedisSignalPusher:
    def __init__(
        self, url: str, recorder: SignalRecorder, prefix: str = "merlin-dp", every: float = 1.0
    ) -> None:
        self.url = url
        self.recorder = recorder
        self.stream = signals_stream(prefix)
        self.every = every
        # Unique per worker (several share a pid in tests, and a host in production).
        self.sender = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.pushed_second = -1
        self.failures = 0

    async def run(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        client = aioredis.from_url(self.url, socket_connect_timeout=2.0, socket_timeout=2.0)
        try:
            while True:
                await asyncio.sleep(self.every)
                records = self.recorder.since(self.pushed_second)
                try:
                    # An empty entry still says "this gateway is alive and idle".
                    await client.xadd(
                        self.stream,
                        {"sender": self.sender, "records": json.dumps(records)},
                        maxlen=STREAM_MAXLEN,
                        approximate=True,
                    )
                except (RedisError, OSError) as exc:
                    raise_if_cancelling()
                    self.failures += 1
                    log.debug("pushing signals to %s failed: %s", self.url, exc)
                    continue
                if records:
                    self.pushed_second = max(r["second"] for r in records)
        finally:
            await client.aclose()
