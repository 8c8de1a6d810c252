"""The controller: one place where state changes, is saved, published and audited.

:meth:`Controller.change` runs a pure transition from :mod:`controller.state` under a
lock, saves the result (durable before visible), then publishes the new route table and
writes the audit entry. Runtime events (replicas ready, gone, a version failed) come in
through the same path, so every revision a gateway sees was first written to the store.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from controller.feed import RouteFeed
from controller.models import ControllerState, VersionEndpoint
from controller.runtime import DeploySpec, Runtime, RuntimeEvent
from controller.state import route_table, runtime_update, version_key
from controller.store import Store

log = logging.getLogger("controller")

Transition = Callable[[ControllerState], ControllerState]


class Controller:
    def __init__(
        self,
        store: Store,
        runtime: Runtime | None,
        *,
        max_versions: int = 2,
        domain: str = "localhost",
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.max_versions = max_versions
        self.domain = domain
        self.state = ControllerState()
        self.feed = RouteFeed()
        self._lock = asyncio.Lock()
        self._pending_events: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loaded = await self.store.load()
        if loaded is not None:
            self.state = loaded
        await self.feed.publish(route_table(self.state))
        if self.runtime is not None:
            # Replicas don't survive the controller: start every deployed version again.
            for rec in self.state.versions.values():
                if rec.status in ("pending", "running", "serving"):
                    await self.runtime.deploy(deploy_spec(rec))

    async def change(self, transition: Transition, audit: dict[str, Any]) -> ControllerState:
        async with self._lock:
            new = transition(self.state)  # raises ApiError: nothing happened
            await self.store.save(new)
            self.state = new
            await self.feed.publish(route_table(new))
        await self.store.audit({"at": time.time(), "revision": new.revision, **audit})
        return new

    # --- the runtime's side -------------------------------------------------------------

    def on_runtime_event(self, event: RuntimeEvent) -> None:
        task = asyncio.get_running_loop().create_task(self._apply_logged(event))
        self._pending_events.add(task)
        task.add_done_callback(self._pending_events.discard)

    async def _apply_logged(self, event: RuntimeEvent) -> None:
        try:
            await self._apply_event(event)
        except Exception:
            log.exception("could not apply runtime event %s", event)

    async def _apply_event(self, event: RuntimeEvent) -> None:
        if event.kind in ("replica_started", "scaled", "replica_exited"):
            return
        assert self.runtime is not None
        ready = [r.address for r in self.runtime.replicas(event.key) if r.state == "ready"]
        failed = event.message if event.kind == "failed" else None

        def transition(state: ControllerState) -> ControllerState:
            return runtime_update(state, event.key, replicas=ready, failed=failed) or state

        async with self._lock:
            new = transition(self.state)
            if new is self.state:
                return
            await self.store.save(new)
            self.state = new
            await self.feed.publish(route_table(new))
        if failed:
            log.error("version endpoint %s failed: %s", event.key, failed)
            await self.store.audit({"at": time.time(), "revision": new.revision, "who": "runtime",
                                    "action": "failed", "target": event.key})  # fmt: skip

    async def close(self) -> None:
        for task in list(self._pending_events):
            task.cancel()
        if self.runtime is not None:
            await self.runtime.close()
        await self.store.close()

    def url(self, project: str, name: str) -> str:
        return f"http://{name}.{project}.{self.domain}"


def deploy_spec(rec: VersionEndpoint) -> DeploySpec:
    spec = rec.spec
    if spec.type == "custom":
        command = tuple(spec.command)
    elif spec.type == "pyfunc":
        command = (sys.executable, "-m", "controller.servers.pyfunc", spec.pyfunc_class)
    else:
        command = (sys.executable, "-m", "controller.servers.sklearn")
    return DeploySpec(
        project=rec.project,
        model=rec.model,
        version=rec.version,
        command=command,
        env=dict(spec.env_vars),
        protocol=spec.protocol,
        artifact=spec.model_dir,
        replicas=max(spec.resource_request.min_replica, 1),
        cpu_request=spec.resource_request.cpu_request,
        memory_request=spec.resource_request.memory_request,
        ready_deadline_s=spec.ready_deadline_seconds,
    )


def describe_command(rec: VersionEndpoint) -> str:
    return shlex.join(deploy_spec(rec).command)


__all__ = ["Controller", "deploy_spec", "version_key"]
