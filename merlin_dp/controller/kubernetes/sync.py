"""Kubernetes mode, put together: the cluster is where routing state lives.

:class:`KubernetesSync` keeps two informers (ModelEndpoints; EndpointSlices with a
project label) in one namespace. After any change it re-derives the controller state
(:func:`controller.cluster.derive`) and applies it through
:meth:`Controller.change`, so gateways follow exactly as in local mode; the leader then
writes each ModelEndpoint's status. Routing writes through the REST API arrive at
:meth:`KubernetesSync.write` first and become ModelEndpoint patches (or creates and
deletes); only once the API server accepted them does the controller apply them, and the
informer's cache takes the server's answer at once, so ``kubectl apply`` and the API
converge on one state without a flap.

If the API server goes away the informers keep their last content: the last good table
keeps being served and no status is written until it is back.

Revisions: gateways only take a table whose revision is above the one they serve, and a
standby controller counts its own revisions. So a controller starting to lead (or to run
alone) moves its revision to at least the wall clock in milliseconds, above anything an
earlier leader could have published (it would need a change per millisecond).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes.aio.client import ApiClient, CustomObjectsApi, DiscoveryV1Api
from kubernetes.aio.client.exceptions import ApiException

from merlin_dp.common.aio import cancel_and_wait
from merlin_dp.controller.kubernetes.cluster import (
    Derived,
    Version,
    derive,
    one_address_family,
    status_patch,
)
from merlin_dp.controller.kubernetes.informer import Informer, ListCall, selector_text
from merlin_dp.controller.kubernetes.lease import LeaderElector
from merlin_dp.controller.kubernetes.objects import (
    GROUP,
    KIND,
    LEASE_NAME,
    MODEL_LABEL,
    PLURAL,
    PROJECT_LABEL,
    SERVICE_NAME_LABEL,
    VERSION,
)
from merlin_dp.controller.models import ControllerState, ModelEndpoint
from merlin_dp.controller.service import Controller
from merlin_dp.controller.state import ApiError, start_rollout
from merlin_dp.runtime.kubernetes import KubernetesRuntime
from merlin_dp.spec.rollout import RolloutPlan

log = logging.getLogger("merlin_dp.controller.kubernetes")

MERGE_PATCH = "application/merge-patch+json"
# How long our own write overrides the informer's view of an object at most.
WRITE_OVERLAY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class _Written:
    obj: dict[str, Any] | None  # what the server answered; None: deleted
    before: str | None  # the resourceVersion the informer had when we wrote
    until: float  # loop time after which the informer's view wins regardless


def _now_text(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class KubernetesSync:
    def __init__(
        self,
        controller: Controller,
        api: ApiClient,
        namespace: str,
        *,
        identity: str | None = None,
        leader_election: bool = True,
        resync_seconds: float = 300.0,
        lease_seconds: float = 15.0,
        renew_deadline_seconds: float = 10.0,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.controller = controller
        self.api = api
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.clock = clock
        self.objects = CustomObjectsApi(api)
        self.discovery = DiscoveryV1Api(api)
        self.endpoints = Informer(
            f"modelendpoints in {namespace}", self._list_endpoints, self._changed,
            resync_seconds=resync_seconds,
        )  # fmt: skip
        versions: dict[str, str | None] = {PROJECT_LABEL: None}
        self.slices = Informer(
            f"endpointslices in {namespace}", self._slice_lister(versions), self._changed,
            selector=versions, resync_seconds=resync_seconds,
        )  # fmt: skip
        self.versions: dict[str, Version] = {}
        self.runtime = KubernetesRuntime(api, namespace, lambda: self.versions)
        self.elector: LeaderElector | None = None
        if leader_election:
            self.elector = LeaderElector(
                api, namespace, LEASE_NAME, self.identity,
                on_started=self._started_leading, on_stopped=self._stopped_leading,
                lease_seconds=lease_seconds, renew_deadline_seconds=renew_deadline_seconds,
                retry_seconds=retry_seconds, clock=clock,
            )  # fmt: skip
        self.leading = not leader_election
        self.runtime.active = self.leading
        self.derived: Derived | None = None
        # spec.rollout plans that could not start, and why ("project/model" -> why, plan).
        self.plan_refusals: dict[str, tuple[str, RolloutPlan]] = {}
        self.status_writes = 0
        self.status_failures = 0
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._written: dict[str, _Written] = {}  # our API writes the informer hasn't shown

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.controller.cluster = self
        self.controller.ready = self.ready
        self.controller.metrics.append(self.metrics_text)
        await self._move_revision()  # before the first table derived from the cluster
        spawn = self._spawn
        spawn(self.endpoints.run())
        spawn(self.slices.run())
        spawn(self._reconcile_loop())
        if self.elector is not None:
            spawn(self.elector.run())

    def ready(self) -> tuple[bool, str]:
        if not (self.endpoints.synced.is_set() and self.slices.synced.is_set()):
            return False, "not yet synced with the Kubernetes API"
        if not self.leading:
            return False, "standby: another controller holds the lease"
        return True, "leading" if self.elector is not None else "ok"

    def metrics_text(self) -> str:
        """Prometheus text: leadership, and how the watches and writes fare."""
        lines = [
            "# HELP merlin_controller_kubernetes_leading 1 while this controller leads.",
            "# TYPE merlin_controller_kubernetes_leading gauge",
            f"merlin_controller_kubernetes_leading {int(self.leading)}",
            "# HELP merlin_controller_kubernetes_relists_total Lists (first, 410, error, "
            "resync) per collection.",
            "# TYPE merlin_controller_kubernetes_relists_total counter",
        ]
        informers = {"modelendpoints": self.endpoints, "endpointslices": self.slices}
        for name, inf in informers.items():
            lines.append(f'merlin_controller_kubernetes_relists_total{{resource="{name}"}} '
                         f"{inf.relists}")  # fmt: skip
        lines += [
            "# HELP merlin_controller_kubernetes_watch_errors_total Failed lists and watches.",
            "# TYPE merlin_controller_kubernetes_watch_errors_total counter",
        ]
        for name, inf in informers.items():
            lines.append(f'merlin_controller_kubernetes_watch_errors_total{{resource="{name}"}} '
                         f"{inf.errors}")  # fmt: skip
        lines += [
            "# HELP merlin_controller_kubernetes_status_writes_total ModelEndpoint status "
            "writes, by result.",
            "# TYPE merlin_controller_kubernetes_status_writes_total counter",
            f'merlin_controller_kubernetes_status_writes_total{{result="ok"}} {self.status_writes}',
            f'merlin_controller_kubernetes_status_writes_total{{result="failed"}} '
            f"{self.status_failures}",
            "# HELP merlin_controller_kubernetes_scale_failures_total Scale patches that failed.",
            "# TYPE merlin_controller_kubernetes_scale_failures_total counter",
            f"merlin_controller_kubernetes_scale_failures_total {self.runtime.scale_failures}",
        ]
        return "\n".join(lines) + "\n"

    async def close(self) -> None:
        was_leading = self.leading and self.elector is not None
        # The election loop stops first: running beside the release, it could take the
        # Lease straight back.
        await cancel_and_wait(list(self._tasks))
        if was_leading and self.elector is not None:
            await self.elector.release()
        self.controller.cluster = None
        await self.api.close()  # type: ignore[no-untyped-call]

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    def follow_gateways(self, service: str, on_urls: Callable[[list[str]], None]) -> None:
        """Tell ``on_urls`` every gateway's admin URL, from the EndpointSlices of the
        headless admin Service (a Service's virtual IP reaches one gateway per request,
        and the autoscaler needs all of them)."""
        informer: Informer

        def changed() -> None:
            on_urls(gateway_urls(informer.objects.values()))

        selector: dict[str, str | None] = {SERVICE_NAME_LABEL: service}
        informer = Informer(
            f"gateways ({service}) in {self.namespace}", self._slice_lister(selector), changed,
            selector=selector, resync_seconds=self.endpoints.resync_seconds,
        )  # fmt: skip
        self._spawn(informer.run())

    # --- leadership ----------------------------------------------------------------------

    def _started_leading(self) -> None:
        self.leading = True
        self.runtime.active = True
        self._spawn(self._move_revision())
        self._dirty.set()  # write the statuses a standby did not

    def _stopped_leading(self) -> None:
        self.leading = False
        self.runtime.active = False

    async def _move_revision(self) -> None:
        floor = int(self.clock() * 1000)

        def transition(state: ControllerState) -> ControllerState:
            if state.revision >= floor:
                return state
            return state.model_copy(update={"revision": floor})

        await self.controller.change(transition, None, observed=True)

    # --- from the cluster ----------------------------------------------------------------

    async def _list_endpoints(self, watch: bool, version: str | None) -> aiohttp.ClientResponse:
        call = self.objects.list_namespaced_custom_object_without_preload_content
        resp: aiohttp.ClientResponse = await call(
            GROUP, VERSION, self.namespace, PLURAL, watch=watch, resource_version=version,
            allow_watch_bookmarks=watch or None, _request_timeout=_timeout(watch),
        )  # fmt: skip
        return resp

    def _slice_lister(self, selector: dict[str, str | None]) -> ListCall:
        async def list_call(watch: bool, version: str | None) -> aiohttp.ClientResponse:
            call = self.discovery.list_namespaced_endpoint_slice_without_preload_content
            resp: aiohttp.ClientResponse = await call(
                self.namespace, label_selector=selector_text(selector), watch=watch,
                resource_version=version, allow_watch_bookmarks=watch or None,
                _request_timeout=_timeout(watch),
            )  # fmt: skip
            return resp

        return list_call

    def _changed(self) -> None:
        self._dirty.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not (self.endpoints.synced.is_set() and self.slices.synced.is_set()):
                continue  # half a picture would drop routes: wait for both lists
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconciling the cluster's state failed; retrying")
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def reconcile(self) -> None:
        """Derive the state from the caches, apply it, then (leader) write statuses."""
        slices = list(self.slices.objects.values())
        endpoints = self._with_writes(self.endpoints.objects)
        derived: Derived | None = None

        def transition(state: ControllerState) -> ControllerState:
            nonlocal derived
            derived = derive(state, endpoints, slices, now=self.clock())
            return derived.state

        await self.controller.change(transition, None, observed=True)
        assert derived is not None
        self.derived = derived
        self.versions = derived.versions
        if self.leading:
            await self._start_declared_rollouts(derived)
            await self._write_statuses(derived, endpoints)

    async def _start_declared_rollouts(self, derived: Derived) -> None:
        """A ModelEndpoint whose spec.rollout differs from the plan of its last rollout
        asks for a new one (the API writes its plans there too, so they agree)."""
        for key, plan in derived.plans.items():
            last = self.controller.state.rollouts.get(key)
            if last is not None and last.plan == plan:
                continue
            if self.plan_refusals.get(key, ("", None))[1] == plan:
                continue  # refused already; a changed plan is tried again
            project, model = key.split("/")
            try:
                if self.controller.rollouts is None:
                    raise ApiError(409, "conflict", "rollouts need the gateways' signals: "
                                   "start the controller with --gateway-admin-service")  # fmt: skip
                start = functools.partial(start_rollout, project=project, model=model,
                                          plan=plan, by="kubernetes", now=self.clock())  # fmt: skip
                await self.controller.change(start, {"who": "kubernetes",
                                                     "action": "rollout_start", "target": key,
                                                     "candidate": plan.candidate})  # fmt: skip
                self.controller.rollouts.count("started")
                self.plan_refusals.pop(key, None)
            except ApiError as exc:
                log.warning("spec.rollout of %s not started: %s", key, exc.message)
                self.plan_refusals[key] = (exc.message, plan)

    async def _write_statuses(self, derived: Derived, endpoints: dict[str, dict[str, Any]]) -> None:
        now = datetime.datetime.fromtimestamp(self.clock(), tz=datetime.UTC)
        state = self.controller.state
        for name, obj in endpoints.items():
            condition = derived.conditions.get(name)
            if condition is None:
                continue
            key = derived.keys.get(name)
            routed = state.endpoints.get(key) if key is not None else None
            owns = derived.owners.get(key or "") == name and routed is not None
            rollout = state.rollouts.get(key or "") if owns else None
            error = derived.plan_errors.get(name) or (
                self.plan_refusals.get(key or "", (None,))[0] if owns else None)  # fmt: skip
            status = status_patch(obj, condition, routed.revision if owns and routed else None,
                                  now, json.loads(rollout.model_dump_json()) if rollout else None,
                                  error)  # fmt: skip
            if status is None:
                continue
            try:
                await self.objects.patch_namespaced_custom_object_status(
                    GROUP, VERSION, self.namespace, PLURAL, name, {"status": status},
                    _content_type=MERGE_PATCH,
                )  # fmt: skip
                self.status_writes += 1
            except Exception as exc:  # written on the next change or resync
                self.status_failures += 1
                log.warning("could not write the status of ModelEndpoint %s: %s", name, exc)

    # --- to the cluster (the REST API's routing writes) ------------------------------------

    async def write(self, old: ControllerState, new: ControllerState) -> None:
        if set(new.versions) != set(old.versions) or any(
            new.versions[k].spec != old.versions[k].spec for k in new.versions
        ):
            raise ApiError(
                409, "managed_by_kubernetes",
                "version endpoints are Deployments and Services in Kubernetes mode",
            )  # fmt: skip
        for key in sorted(set(old.endpoints) | set(new.endpoints)):
            before, after = old.endpoints.get(key), new.endpoints.get(key)
            started = new.rollouts.get(key)
            if started is not None and started.started == getattr(
                old.rollouts.get(key), "started", None
            ):
                started = None  # only a new rollout's plan is written to the spec
            if after is None:
                await self._delete(key)
            elif (before is None or (before.rule, before.protocol) != (after.rule, after.protocol)
                    or started is not None):  # fmt: skip
                await self._put(after, started.plan if started is not None else None)
        # The cache already holds what the server answered, so its watch event changes
        # nothing there: reconcile anyway, for the status.
        self._dirty.set()

    def _owner(self, key: str) -> str | None:
        """The ModelEndpoint that routes (or would route) ``key``: the one to edit."""
        return self.derived.owners.get(key) if self.derived is not None else None

    def _wrote(self, name: str, obj: dict[str, Any] | None) -> None:
        cached = self.endpoints.objects.get(name)
        before = (cached or {}).get("metadata", {}).get("resourceVersion")
        until = asyncio.get_running_loop().time() + WRITE_OVERLAY_SECONDS
        self._written[name] = _Written(obj, before, until)

    def _with_writes(self, cached: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The informer's objects with our own writes on top until the informer shows
        them: a relist that was read before a write (or a late watch event) must not put
        the old rule back for a moment."""
        endpoints = dict(cached)
        now = asyncio.get_running_loop().time()
        for name, w in list(self._written.items()):
            seen = cached.get(name)
            version = (seen or {}).get("metadata", {}).get("resourceVersion")
            shown = seen is None if w.obj is None else (
                seen is not None and seen.get("spec") == w.obj.get("spec")
            )  # fmt: skip
            # A newer resourceVersion than the one we wrote over: ours or a later write.
            if shown or now > w.until or (version is not None and version != w.before):
                del self._written[name]
            elif w.obj is None:
                endpoints.pop(name, None)
            else:
                endpoints[name] = w.obj
        return endpoints

    async def _put(self, endpoint: ModelEndpoint, plan: RolloutPlan | None = None) -> None:
        key = f"{endpoint.project}/{endpoint.model}"
        name = self._owner(key)
        rule = json.loads(endpoint.rule.model_dump_json())
        body: dict[str, Any] | None = None
        try:
            if name is not None:
                # Merge patch: the rule's unset fields go as null, which deletes them.
                patch: dict[str, Any] = {"spec": {"protocol": endpoint.protocol, "rule": rule}}
                if plan is not None:
                    patch["spec"]["rollout"] = json.loads(plan.model_dump_json())
                obj = await self.objects.patch_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, patch,
                    _content_type=MERGE_PATCH,
                )  # fmt: skip
            else:
                # <project>.<model>: names have no dots, so no two models share one.
                name = f"{endpoint.project}.{endpoint.model}"
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "metadata": {
                        "name": name,
                        "namespace": self.namespace,
                        "labels": {PROJECT_LABEL: endpoint.project, MODEL_LABEL: endpoint.model},
                    },
                    "spec": {
                        "project": endpoint.project,
                        "model": endpoint.model,
                        "protocol": endpoint.protocol,
                        "rule": json.loads(endpoint.rule.model_dump_json(exclude_none=True)),
                    },
                }
                obj = await self.objects.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, body
                )
        except ApiException as exc:
            raise _api_error(exc, f"ModelEndpoint {self.namespace}/{name}") from exc
        except Exception as exc:
            raise _unavailable(exc) from exc
        if not isinstance(obj, dict) and body is not None:
            # A server that answers create with 200 leaves the generated client with no
            # object (the kmock stand-in): what we sent, as created now.
            obj = json.loads(json.dumps(body))
            obj["metadata"]["creationTimestamp"] = _now_text(self.clock())
        if isinstance(obj, dict):
            self._wrote(name, obj)

    async def _delete(self, key: str) -> None:
        name = self._owner(key)
        if name is None:
            return
        try:
            await self.objects.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"ModelEndpoint {self.namespace}/{name}") from exc
        except Exception as exc:
            raise _unavailable(exc) from exc
        self._wrote(name, None)


def gateway_urls(slices: Iterable[dict[str, Any]]) -> list[str]:
    """``http://ip:port`` of every ready endpoint, at the port named ``admin`` (or the
    slice's only port)."""
    urls = set()
    for s in one_address_family(slices):  # a dual-stack gateway is polled once
        ports = s.get("ports") or []
        named = [p for p in ports if p.get("name") == "admin"] or (ports if len(ports) == 1 else [])
        if not named or not isinstance(named[0].get("port"), int):
            continue
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            if cond.get("ready", True) is False or cond.get("terminating"):
                continue
            for address in (ep.get("addresses") or [])[:1]:
                host = f"[{address}]" if ":" in address else address
                urls.add(f"http://{host}:{named[0]['port']}")
    return sorted(urls)


def _timeout(watch: bool) -> float | None:
    # A watch lasts until the informer's resync; a list gets the client's usual limit.
    return None if not watch else 3600.0


def _api_error(exc: ApiException, what: str) -> ApiError:
    if exc.status in (401, 403):
        return ApiError(503, "kubernetes_forbidden", f"the Kubernetes API refused to change "
                        f"{what} ({exc.status}): check the controller's RBAC")  # fmt: skip
    if exc.status == 409:
        return ApiError(409, "conflict", f"{what} changed meanwhile; read it again and retry")
    if exc.status == 422:
        why = exc.reason or f"status {exc.status}"  # the client leaves reason None at times
        return ApiError(422, "invalid", f"the Kubernetes API refused {what}: {why}")
    return ApiError(503, "kubernetes_unavailable",
                    f"the Kubernetes API could not change {what} ({exc.status})")  # fmt: skip


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(
        503, "kubernetes_unavailable",
        f"the Kubernetes API is unreachable ({type(exc).__name__}); nothing changed",
    )  # fmt: skip
