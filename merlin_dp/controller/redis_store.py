"""A store in Redis, shared by several controllers, one writer at a time.

Keys under a prefix (default ``merlin-dp``): ``:state`` (the JSON document),
``:revision``, ``:routes`` (the latest route table, for gateways that follow Redis),
``:audit`` (a capped list), ``:lease``; channel ``:routes`` carries every new table.

A write takes the lease (``SET NX PX`` with a random token; released only by its holder,
expires if the holder dies), then saves with a compare-and-set on the revision in one
Lua script that also publishes the table. Redis going away turns every write into a
:class:`~merlin_dp.controller.store.StoreError` (the API answers 503) and leaves nothing
half-applied; reads keep answering from the controller's last known state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from merlin_dp.common.aio import close_quietly, raise_if_cancelling
from merlin_dp.controller.models import ControllerState
from merlin_dp.controller.store import StaleState, StoreError

SAVE = """
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('PUBLISH', KEYS[3], ARGV[4])
return 'ok'
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
AUDIT_LIMIT = 10_000


class RedisStore:
    def __init__(
        self, url: str, prefix: str = "merlin-dp", lease_ms: int = 5000, wait_s: float = 5.0
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.lease_ms = lease_ms
        self.wait_s = wait_s
        self.description = f"redis {url} ({prefix})"
        self.shared = True
        self.redis = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._save = self.redis.register_script(SAVE)
        self._release = self.redis.register_script(RELEASE)

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    async def load(self) -> ControllerState | None:
        try:
            raw = await self.redis.get(self.key("state"))
        except RedisError as exc:
            raise StoreError(f"redis unavailable: {exc}") from exc
        if raw is None:
            return None
        try:
            return ControllerState.model_validate_json(raw)
        except ValueError as exc:
            raise StoreError(f"{self.key('state')} is not a valid state document: {exc}") from exc

    async def save(self, state: ControllerState, expected: int, routes: bytes) -> None:
        keys = [self.key("state"), self.key("revision"), self.key("routes")]
        args: list[str | bytes] = [
            str(expected),
            state.model_dump_json(),
            str(state.revision),
            routes,
        ]
        try:
            result = await self._save(keys=keys, args=args)
        except RedisError as exc:
            raise StoreError(f"redis unavailable: {exc}") from exc
        if result != b"ok":
            raise StaleState(f"state moved to revision {result!r} meanwhile")

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[None]:
        token = secrets.token_hex(16)
        key = self.key("lease")
        deadline = asyncio.get_running_loop().time() + self.wait_s
        delay = 0.005
        try:
            while not await self.redis.set(key, token, nx=True, px=self.lease_ms):
                if asyncio.get_running_loop().time() > deadline:
                    raise StoreError("another controller holds the write lease; try again")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
        except RedisError as exc:
            raise StoreError(f"redis unavailable: {exc}") from exc
        try:
            yield
        finally:
            with contextlib.suppress(RedisError):
                await self._release(keys=[key], args=[token])

    async def changes(self) -> AsyncIterator[int]:
        """Revisions published by any controller; reconnects by itself."""
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.key("routes"))
                delay = 0.1
                # Whatever was saved while we were not subscribed: read it now.
                stored = await self.redis.get(self.key("revision"))
                if stored is not None:
                    yield int(stored)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield int(json.loads(message["data"])["revision"])
            except (RedisError, OSError, ValueError, KeyError):
                raise_if_cancelling()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await close_quietly(pubsub.aclose())

    async def audit(self, entry: dict[str, Any]) -> None:
        try:
            await self.redis.lpush(self.key("audit"), json.dumps(entry, sort_keys=True))
            await self.redis.ltrim(self.key("audit"), 0, AUDIT_LIMIT - 1)
        except RedisError as exc:
            raise StoreError(f"redis unavailable: {exc}") from exc

    async def read_audit(self, limit: int) -> list[dict[str, Any]]:
        try:
            raw = await self.redis.lrange(self.key("audit"), 0, limit - 1)
        except RedisError as exc:
            raise StoreError(f"redis unavailable: {exc}") from exc
        return [json.loads(item) for item in reversed(raw)]

    async def close(self) -> None:
        await close_quietly(self.redis.aclose())
