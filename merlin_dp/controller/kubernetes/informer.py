"""One collection of Kubernetes objects kept in memory: list, then watch, forever.

An :class:`Informer` lists a collection (one namespace, one label selector), then
watches it from the list's ``resourceVersion``, keeping a cache keyed by name. It calls
``on_change`` after every change to the cache, never for an event that changed nothing,
so duplicate ADDED events (normal after a watch restarts) are free. It relists:

- on ``410 Gone`` (the server no longer has our resourceVersion) and on any watch or
  list error, with a capped exponential back-off;
- every ``resync_seconds`` even when the watch is healthy, so an event lost anywhere
  (a proxy that dropped a stream quietly, a server that ignores resourceVersion) is made
  good by the next list. A relist replaces the cache: what the list lacks was deleted.

While it can't reach the API server the cache keeps its last content, so the route table
built from it keeps serving. Labels are also checked here, not only by the server: a
server that ignores ``labelSelector`` must not slip other objects into the cache.

Objects stay plain JSON dicts (``_preload_content=False``): nothing here needs the typed
models, and skipping them keeps a large relist cheap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

log = logging.getLogger("merlin_dp.controller.kubernetes")

Obj = dict[str, Any]


# list_call(watch, resource_version) -> the raw response of a list or watch request (what
# kubernetes.aio's ``*_without_preload_content`` calls return).
ListCall = Callable[[bool, str | None], Awaitable[aiohttp.ClientResponse]]


class Gone(Exception):
    """410: the resourceVersion we watch from is too old; relist."""


class ApiUnavailable(Exception):
    """A list or watch failed for a reason other than 410."""


def labels_match(obj: Mapping[str, Any], selector: Mapping[str, str | None]) -> bool:
    """Equality selectors; a None value means "the label exists"."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, value in selector.items():
        if key not in labels or (value is not None and labels[key] != value):
            return False
    return True


def selector_text(selector: Mapping[str, str | None]) -> str | None:
    if not selector:
        return None
    return ",".join(k if v is None else f"{k}={v}" for k, v in sorted(selector.items()))


def object_name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


class Informer:
    def __init__(
        self,
        what: str,
        list_call: ListCall,
        on_change: Callable[[], None],
        *,
        selector: Mapping[str, str | None] | None = None,
        resync_seconds: float = 300.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
    ) -> None:
        self.what = what
        self.list_call = list_call
        self.on_change = on_change
        self.selector = dict(selector or {})
        self.resync_seconds = resync_seconds
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.objects: dict[str, Obj] = {}
        self.synced = asyncio.Event()  # set once the first list succeeded
        self.relists = 0
        self.errors = 0

    async def run(self) -> None:
        delay = self.backoff_initial
        while True:
            resync: asyncio.Timeout | None = None
            try:
                version = await self._list()
                delay = self.backoff_initial
                async with asyncio.timeout(self.resync_seconds) as resync:
                    await self._watch(version)
            except Gone:
                log.info("%s: watch expired (410 Gone); relisting", self.what)
                continue
            except TimeoutError as exc:
                if resync is not None and resync.expired():
                    continue  # the periodic resync: relist at once
                self._failed(exc, delay)
            except Exception as exc:  # aiohttp, JSON and client errors share no base
                self._failed(exc, delay)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.backoff_max)

    def _failed(self, exc: BaseException, delay: float) -> None:
        self.errors += 1
        log.warning(
            "%s: %s: %s; keeping the last %d objects, retrying in %.1fs",
            self.what, type(exc).__name__, exc, len(self.objects), delay,
        )  # fmt: skip

    async def _list(self) -> str | None:
        resp = await self.list_call(False, None)
        try:
            body = await resp.read()
        finally:
            resp.release()
        if resp.status == 410:
            raise Gone()
        if resp.status != 200:
            raise ApiUnavailable(f"list answered {resp.status}: {body[:200]!r}")
        doc = json.loads(body)
        items = [o for o in doc.get("items") or [] if labels_match(o, self.selector)]
        fresh = {object_name(o): o for o in items}
        self.relists += 1
        changed = fresh != self.objects
        self.objects = fresh
        first = not self.synced.is_set()
        self.synced.set()
        if changed or first:
            self.on_change()
        version = (doc.get("metadata") or {}).get("resourceVersion")
        return version if isinstance(version, str) and version else None

    async def _watch(self, version: str | None) -> None:
        resp = await self.list_call(True, version)
        try:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                body = await resp.read()
                raise ApiUnavailable(f"watch answered {resp.status}: {body[:200]!r}")
            content = resp.content
            while True:
                line = await content.readline()
                if not line:
                    # The server ended the watch (its timeout): relist soon, not in a spin.
                    raise ApiUnavailable("the watch stream ended")
                if line.strip():
                    self._event(json.loads(line))
        finally:
            resp.close()  # a watch never ends by itself: its connection can't be reused

    def _event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            raise ApiUnavailable(f"watch error {code}: {obj.get('message', '')}")
        if kind == "BOOKMARK" or not isinstance(obj, dict):
            return
        name = object_name(obj)
        if not name:
            return
        if kind == "DELETED" or not labels_match(obj, self.selector):
            # An object whose labels no longer match has left the collection.
            if self.objects.pop(name, None) is not None:
                self.on_change()
            return
        if kind in ("ADDED", "MODIFIED"):
            if self.objects.get(name) == obj:
                return  # a replayed ADDED, or a no-op update
            self.objects[name] = obj
            self.on_change()
