"""Where route tables come from. Each source validates before it hands a table over.

A source calls ``apply(spec)`` with every new valid table and ``reject(reason)`` with
every one it could not accept; the gateway keeps serving the last good table across
rejections. :class:`FileRouteSource` follows a route file (re-read when it changes, or
at once on SIGHUP).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import aiohttp
from pydantic import ValidationError

from merlin_dp.common.aio import close_quietly, raise_if_cancelling
from merlin_dp.spec.routes import (
    RouteFileError,
    RouteTableSpec,
    describe_validation_error,
    load_route_file,
)

log = logging.getLogger("merlin_dp.spec.routes")

Apply = Callable[[RouteTableSpec], None]
Reject = Callable[[str], None]


class RouteSource(Protocol):
    description: str
    connected: bool  # following its source now (a file always is)
    last_error: str | None

    async def run(self, apply: Apply, reject: Reject) -> None: ...

    def poke(self) -> None:
        """Look for a new table now rather than at the next interval."""


class FileRouteSource:
    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self.description = f"file {path}"
        self.connected = True
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def poke(self) -> None:
        self._wake.set()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def run(self, apply: Apply, reject: Reject) -> None:
        seen: tuple[int, int, int] | None = None
        first = True
        while True:
            signature = self._signature()
            if first or signature != seen or self._wake.is_set():
                self._wake.clear()
                first = False
                seen = signature
                try:
                    spec = load_route_file(self.path)
                except RouteFileError as exc:
                    log.error("route file rejected, still serving the last good table: %s", exc)
                    self.last_error = str(exc)
                    reject(str(exc))
                else:
                    apply(spec)
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                raise_if_cancelling()


class _TableFeed:
    """What the streamed sources share: take a whole table as JSON, keep the newest."""

    description: str
    revision: int

    def _take(self, raw: bytes | str, apply: Apply, reject: Reject) -> None:
        try:
            spec = RouteTableSpec.model_validate_json(raw)
        except ValidationError as exc:
            message = (
                f"{self.description} sent an invalid route table: " + describe_validation_error(exc)
            )
            log.error("%s; still serving revision %d", message, self.revision)
            reject(message)
            return
        if spec.revision > self.revision:
            self.revision = spec.revision
            apply(spec)


class ControllerRouteSource(_TableFeed):
    """Follows the controller's watch stream (``GET /v1/routes?watch=1&since=R``).

    Each line is a whole route table; blank lines are heartbeats. After a disconnect it
    reconnects with back-off and resumes from the revision it serves; meanwhile the
    gateway keeps serving that table and ``connected`` is false.
    """

    STALL_SECONDS = 45.0  # three missed heartbeats: the connection is dead

    def __init__(self, url: str, token: str | None = None, max_backoff: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.max_backoff = max_backoff
        self.description = f"controller {self.url}"
        self.connected = False
        self.last_error: str | None = None
        self.revision = -1
        self._wake = asyncio.Event()

    def poke(self) -> None:
        self._wake.set()

    async def run(self, apply: Apply, reject: Reject) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=self.STALL_SECONDS)
        backoff = 0.05
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                try:
                    await self._follow(session, apply, reject)
                    problem = "the controller closed the stream"
                except (aiohttp.ClientError, TimeoutError, OSError, _Refused) as exc:
                    raise_if_cancelling()
                    problem = str(exc) or type(exc).__name__
                if self.connected:
                    backoff = 0.05
                    log.warning("lost the controller (%s); serving revision %d", problem,
                                self.revision)  # fmt: skip
                self.connected = False
                self.last_error = problem
                self._wake.clear()
                try:
                    async with asyncio.timeout(backoff):
                        await self._wake.wait()
                except TimeoutError:
                    raise_if_cancelling()
                backoff = min(backoff * 2, self.max_backoff)

    async def _follow(self, session: aiohttp.ClientSession, apply: Apply, reject: Reject) -> None:
        params = {"watch": "1", "since": str(self.revision)}
        async with session.get(f"{self.url}/v1/routes", params=params) as resp:
            if resp.status != 200:
                raise _Refused(f"controller answered {resp.status}: {(await resp.text())[:300]}")
            self.connected = True
            self.last_error = None
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._take(line, apply, reject)


class _Refused(Exception):
    pass


class RedisRouteSource(_TableFeed):
    """Follows the route tables controllers publish in Redis.

    Subscribes to the ``<prefix>:routes`` channel first, then reads the latest table from
    the ``<prefix>:routes`` key, so no revision falls between the two; reconnects with
    back-off and keeps serving the last good table meanwhile.
    """

    def __init__(self, url: str, prefix: str = "merlin-dp", max_backoff: float = 1.0) -> None:
        self.url = url
        self.key = f"{prefix}:routes"
        self.max_backoff = max_backoff
        self.description = f"redis {url} ({self.key})"
        self.connected = False
        self.last_error: str | None = None
        self.revision = -1

    def poke(self) -> None:
        return None

    async def run(self, apply: Apply, reject: Reject) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        backoff = 0.05
        while True:
            client = aioredis.from_url(self.url, socket_connect_timeout=2.0)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.key)
                latest = await client.get(self.key)
                self.connected, self.last_error, backoff = True, None, 0.05
                if latest is not None:
                    self._take(latest, apply, reject)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._take(message["data"], apply, reject)
                problem = "redis closed the subscription"
            except (RedisError, OSError) as exc:
                raise_if_cancelling()
                problem = str(exc) or type(exc).__name__
            finally:
                await close_quietly(pubsub.aclose())
                await close_quietly(client.aclose())
            if self.connected:
                log.warning("lost redis (%s); serving revision %d", problem, self.revision)
            self.connected, self.last_error = False, problem
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
