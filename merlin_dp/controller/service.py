"""The controller: one place where state changes, is saved, published and audited.

:meth:`Controller.change` runs a pure transition from :mod:`merlin_dp.controller.state` under a
lock, saves the result (durable before visible), then publishes the new route table and
writes the audit entry. Runtime events (replicas ready, gone, a version failed) come in
through the same path, so every revision a gateway sees was first written to the store.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from merlin_dp.common.aio import cancel_and_wait
from merlin_dp.controller.feed import RouteFeed
from merlin_dp.controller.models import ControllerState, VersionEndpoint
from merlin_dp.controller.state import route_table, runtime_update, version_key
from merlin_dp.controller.statedir import StateDirLock
from merlin_dp.controller.store import Store, StoreError
from merlin_dp.controller.timeseries import TimeSeries
from merlin_dp.controller.urls import PublicGateway, model_url
from merlin_dp.runtime import DeploySpec, Runtime, RuntimeEvent
from merlin_dp.spec.rollout import RolloutStatus

log = logging.getLogger("controller")

Transition = Callable[[ControllerState], ControllerState]


class ClusterWriter(Protocol):
    """Where API changes go first in Kubernetes mode (merlin_dp.controller.kubernetes.sync)."""

    async def write(self, old: ControllerState, new: ControllerState) -> None:
        """Make the cluster say ``new``'s model endpoints; raise ApiError if it can't."""

    async def close(self) -> None:
        """Stop following the cluster."""


class RolloutView(Protocol):
    """The running rollouts as they stand (merlin_dp.controller.rollouts)."""

    def status(self, key: str) -> RolloutStatus | None:
        """A model endpoint's rollout with the evidence counted so far."""

    def count(self, result: str) -> None:
        """Count a decision taken through the API (start, pause, resume, abort)."""


class Controller:
    def __init__(
        self,
        store: Store,
        runtime: Runtime | None,
        *,
        max_versions: int = 2,
        public: PublicGateway | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.max_versions = max_versions
        # Where clients reach the gateway, for the URLs in answers (`up` sets its own).
        self.public = public or PublicGateway()
        # The state directory's lock, released last when the controller closes.
        self.state_dir_lock: StateDirLock | None = None
        self.state = ControllerState()
        self.feed = RouteFeed()
        self._lock = asyncio.Lock()
        self._pending_events: set[asyncio.Task[None]] = set()
        self._deployed: dict[str, int] = {}  # version key -> generation the runtime runs
        # Gateways' pokes for versions at zero go here: (version key, requests waiting).
        self.activations: Callable[[str, int], None] | None = None
        # Prometheus text of attached parts (autoscaler, Kubernetes sync): GET /metrics.
        self.metrics: list[Callable[[], str]] = []
        # Kubernetes mode: routing writes become ModelEndpoint patches before they apply.
        self.cluster: ClusterWriter | None = None
        # Rollouts run beside the controller when gateways' signals are at hand.
        self.rollouts: RolloutView | None = None
        # The short history the console and the SDK read (controller/timeseries.py).
        self.series: TimeSeries | None = None
        # What /readyz says (Kubernetes mode: synced with the API server, and leading).
        self.ready: Callable[[], tuple[bool, str]] = lambda: (True, "ok")

    async def start(self) -> None:
        loaded = await self.store.load()
        if loaded is not None:
            self.state = loaded
        await self.feed.publish(route_table(self.state))
        if self.store.shared:
            self._spawn(self._follow_store())
        if self.runtime is not None:
            # Replicas don't survive the controller: start every deployed version again.
            await self.reconcile_runtime()
            self._spawn(self._resync())

    async def reconcile_runtime(self) -> None:
        """Make the runtime run what the state says, by generation: deploy what is new
        or changed, undeploy what was terminated. Idempotent."""
        if self.runtime is None:
            return
        for key, rec in list(self.state.versions.items()):
            if rec.status in ("pending", "running", "serving"):
                if self._deployed.get(key) != rec.generation:
                    self._deployed[key] = rec.generation
                    await self.runtime.deploy(deploy_spec(rec))
            elif key in self._deployed:
                del self._deployed[key]
                await self.runtime.undeploy(key)

    async def change(
        self, transition: Transition, audit: dict[str, Any] | None, *, observed: bool = False
    ) -> ControllerState:
        """Apply a transition to the latest state, durably, then publish it.

        Raises ApiError (refused: nothing changed) or StoreError (store unavailable:
        nothing changed either). The change runs as its own task: a caller that is
        cancelled (a client gone) can't stop it between saving and publishing. In
        Kubernetes mode a change that is not ``observed`` (read from the cluster) is
        written to the cluster first.
        """
        return await asyncio.shield(
            asyncio.ensure_future(self._change(transition, audit, observed))
        )

    async def _change(
        self, transition: Transition, audit: dict[str, Any] | None, observed: bool
    ) -> ControllerState:
        async with self._lock, self.store.lease():
            current = self.state
            if self.store.shared:
                current = await self.store.load() or ControllerState()
            new = transition(current)
            if new is current:
                return current
            if self.cluster is not None and not observed:
                await self.cluster.write(current, new)
            routes = route_table(new)
            await self.store.save(new, current.revision, routes.model_dump_json().encode())
            self.state = new
            await self.feed.publish(routes)
        if audit is not None:
            try:
                await self.store.audit({"at": time.time(), "revision": new.revision, **audit})
            except StoreError as exc:
                log.error("change %d applied but not audited: %s", new.revision, exc)
        return new

    # --- the runtime's side -------------------------------------------------------------

    def on_runtime_event(self, event: RuntimeEvent) -> None:
        if event.kind in ("replica_started", "scaled", "replica_exited"):
            return
        failed = event.message if event.kind == "failed" else None
        if failed:
            log.error("version endpoint %s failed: %s", event.key, failed)
        self._spawn(self._sync_version(event.key, failed))

    async def _sync_version(self, key: str, failed: str | None = None) -> None:
        assert self.runtime is not None
        ready = [r.address for r in self.runtime.replicas(key) if r.state == "ready"]

        def transition(state: ControllerState) -> ControllerState:
            return runtime_update(state, key, replicas=ready, failed=failed) or state

        audit = {"who": "runtime", "action": "failed", "target": key} if failed else None
        try:
            await self.change(transition, audit)
        except StoreError as exc:
            log.error("runtime change to %s not saved (resync will retry): %s", key, exc)
        except Exception:
            log.exception("runtime change to %s failed", key)

    async def _resync(self, every: float = 5.0) -> None:
        """The runtime's view wins: re-apply it now and then, so an update lost to a
        store outage is made good once the store is back."""
        while True:
            await asyncio.sleep(every)
            # A deploy whose request was cancelled after its save is started here.
            await self.reconcile_runtime()
            for key, rec in list(self.state.versions.items()):
                if rec.status in ("pending", "running", "serving"):
                    await self._sync_version(key)

    async def _follow_store(self) -> None:
        """Pick up what other controllers saved, and pass it on to our watchers."""
        async for revision in self.store.changes():
            if revision <= self.state.revision:
                continue
            try:
                loaded = await self.store.load()
            except StoreError as exc:
                log.warning("could not reload state revision %d: %s", revision, exc)
                continue
            async with self._lock:
                if loaded is not None and loaded.revision > self.state.revision:
                    self.state = loaded
                    await self.feed.publish(route_table(loaded))
            await self.reconcile_runtime()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._logged(coro))
        self._pending_events.add(task)
        task.add_done_callback(self._pending_events.discard)

    @staticmethod
    async def _logged(coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("controller background task failed")

    async def close(self) -> None:
        try:
            if self.cluster is not None:
                await self.cluster.close()
            await cancel_and_wait(list(self._pending_events))
            if self.runtime is not None:
                await self.runtime.close()
            await self.store.close()
        finally:
            # Only once its replicas are stopped may another process take the directory.
            if self.state_dir_lock is not None:
                self.state_dir_lock.release()

    def url(self, project: str, name: str, protocol: str) -> str:
        return model_url(self.public, project, name, protocol)


def deploy_spec(rec: VersionEndpoint) -> DeploySpec:
    spec = rec.spec
    if spec.type == "custom":
        command = tuple(spec.command)
    elif spec.type == "pyfunc":
        server = (
            "merlin_dp.servers.upi" if spec.protocol == "UPI_V1" else "merlin_dp.servers.pyfunc"
        )
        # No class: the pyfunc server loads the package in model_dir.
        command = (sys.executable, "-m", server, *filter(None, [spec.pyfunc_class]))
    else:
        command = (sys.executable, "-m", "merlin_dp.servers.sklearn")
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
        workdir=spec.workdir,
    )


__all__ = ["Controller", "deploy_spec", "version_key"]
