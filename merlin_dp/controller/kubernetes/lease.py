"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go does it.

Several controllers may run; one leads. The leader writes ModelEndpoint status and
scales Deployments; every controller watches the cluster and can take over at once.
A candidate takes the Lease when it is free or its holder has not renewed it for
``lease_seconds``; the leader renews it every ``retry_seconds`` and steps down when it
could not renew for ``renew_deadline_seconds`` (shorter than the lease, so it stops
acting before anyone else may start).

Writes carry the ``resourceVersion`` they read (a real API server refuses a stale one
with 409); after a write the Lease is read back and leadership is only claimed if it
still names us, which also holds on servers that ignore ``resourceVersion``. Time is
injected.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable

from kubernetes.aio.client import ApiClient, CoordinationV1Api
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.client.models import V1Lease, V1LeaseSpec, V1ObjectMeta

log = logging.getLogger("merlin_dp.controller.kubernetes")


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def _micro(seconds: float) -> str:
    """A MicroTime as the API writes it."""
    return _utc(seconds).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        *,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        lease_seconds: float = 15.0,
        renew_deadline_seconds: float = 10.0,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.leases = CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.lease_seconds = lease_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.leading = False
        self._renewed_at = 0.0
        # When we first saw the current holder's renewTime (our clock, not theirs: a
        # candidate whose clock is ahead must not take over early).
        self._observed: tuple[str, datetime.datetime | None] | None = None
        self._observed_at = 0.0

    async def run(self) -> None:
        try:
            while True:
                try:
                    held = await self._try()
                except Exception as exc:  # API, network and client errors share no base
                    log.warning("lease %s/%s: %s: %s", self.namespace, self.name,
                                type(exc).__name__, exc)  # fmt: skip
                    # A blip: a leader keeps leading until its renew deadline passes.
                    held = self.leading and (
                        self.clock() - self._renewed_at < self.renew_deadline_seconds
                    )
                self._set(held)
                await asyncio.sleep(self.retry_seconds)
        finally:
            self._set(False)

    async def release(self) -> None:
        """Give the Lease up on shutdown so a standby takes over without waiting it out.
        Call it once :meth:`run` has stopped; it only clears a Lease that names us."""
        self._set(False)
        try:
            lease = await self.leases.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                # client-go's ReleaseOnCancel: an empty holder, a 1 s lease.
                patch = {"spec": {"holderIdentity": None, "leaseDurationSeconds": 1}}
                await self.leases.patch_namespaced_lease(
                    self.name, self.namespace, patch,
                    _content_type="application/merge-patch+json",
                )  # fmt: skip
        except Exception as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)

    def _set(self, held: bool) -> None:
        if held == self.leading:
            return
        self.leading = held
        if held:
            log.info("leading (lease %s/%s as %s)", self.namespace, self.name, self.identity)
            self.on_started()
        else:
            log.warning("not leading any more (lease %s/%s)", self.namespace, self.name)
            self.on_stopped()

    async def _try(self) -> bool:
        now = self.clock()
        try:
            lease = await self.leases.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await self.leases.create_namespaced_lease(self.namespace, self._new_lease(now, 0))
            return await self._confirm(now)
        spec = lease.spec or V1LeaseSpec()
        holder = spec.holder_identity or ""
        if holder and holder != self.identity:
            seen = (holder, spec.renew_time)
            if seen != self._observed:
                self._observed, self._observed_at = seen, now
            duration = float(spec.lease_duration_seconds or self.lease_seconds)
            if now - self._observed_at < duration:
                return False  # someone else holds it and keeps renewing
        renew: dict[str, object] = {"holderIdentity": self.identity,
                                    "leaseDurationSeconds": int(self.lease_seconds),
                                    "renewTime": _micro(now)}  # fmt: skip
        if holder != self.identity:
            renew["acquireTime"] = _micro(now)
            renew["leaseTransitions"] = int(spec.lease_transitions or 0) + 1
        # resourceVersion in a patch is a precondition: a real API server refuses it (409)
        # if someone wrote the Lease since we read it.
        version = (lease.metadata or V1ObjectMeta()).resource_version
        patch = {"metadata": {"resourceVersion": version} if version else {}, "spec": renew}
        await self.leases.patch_namespaced_lease(
            self.name, self.namespace, patch, _content_type="application/merge-patch+json"
        )
        return await self._confirm(now)

    async def _confirm(self, now: float) -> bool:
        lease = await self.leases.read_namespaced_lease(self.name, self.namespace)
        ours = lease.spec is not None and lease.spec.holder_identity == self.identity
        if ours:
            self._renewed_at = now
        return ours

    def _new_lease(self, now: float, transitions: int) -> V1Lease:
        return V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=int(self.lease_seconds),
                acquire_time=_utc(now),
                renew_time=_utc(now),
                lease_transitions=transitions,
            ),
        )
