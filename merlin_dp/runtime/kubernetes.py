"""The ``kubernetes`` runtime: replicas are EndpointSlice endpoints, scaling is a patch.

It implements :class:`merlin_dp.runtime.Runtime` for the autoscaler. What runs is
whatever the version's Deployment runs (users apply Deployments and Services; nothing
here creates pods), so :meth:`KubernetesRuntime.deploy` and ``undeploy`` refuse.
:meth:`KubernetesRuntime.scale` patches ``deployments/<service name>/scale`` and nothing
else of the Deployment (RBAC grants exactly that). Only the leader scales.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from kubernetes.aio.client import ApiClient, AppsV1Api

from merlin_dp.runtime import DeploySpec, ReplicaInfo, ReplicaState

log = logging.getLogger("merlin_dp.controller.kubernetes")

# A scale request the Deployment has not shown yet is not repeated for this long.
SCALE_REPEAT_SECONDS = 10.0

_STATES: dict[str, ReplicaState] = {"ready": "ready", "starting": "starting",
                                     "draining": "draining"}  # fmt: skip


class Pod(Protocol):
    """A replica as the version's EndpointSlices show it."""

    @property
    def pod(self) -> str: ...
    @property
    def address(self) -> str: ...  # host:port of traffic
    @property
    def metrics_address(self) -> str: ...  # host:port of /metrics
    @property
    def state(self) -> str: ...  # ready | starting | draining


class Deployment(Protocol):
    """A version endpoint as this runtime needs it: the Deployment (named as its Service)
    to scale, and the pods serving it now. The controller's view of the cluster provides
    these (``merlin_dp.controller.kubernetes.cluster.Version``)."""

    @property
    def service(self) -> str: ...
    @property
    def replicas(self) -> Sequence[Pod]: ...


class KubernetesRuntime:
    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        versions: Callable[[], Mapping[str, Deployment]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.apps = AppsV1Api(api)
        self.namespace = namespace
        self.versions = versions
        self.clock = clock
        self.active = False  # set while this controller leads
        self._asked: dict[str, tuple[int, float]] = {}  # key -> (replicas, when)
        self.scale_failures = 0

    def replicas(self, key: str) -> list[ReplicaInfo]:
        v = self.versions().get(key)
        if v is None:
            return []
        return [
            ReplicaInfo(r.pod, r.address, _STATES[r.state], metrics_address=r.metrics_address)
            for r in v.replicas
        ]

    async def scale(self, key: str, replicas: int) -> None:
        if not self.active:
            return
        v = self.versions().get(key)
        if v is None:
            return
        now = self.clock()
        asked = self._asked.get(key)
        if asked is not None and asked[0] == replicas and now - asked[1] < SCALE_REPEAT_SECONDS:
            return  # pods take a while to show up in the slices; don't patch in a loop
        try:
            await self.apps.patch_namespaced_deployment_scale(
                v.service, self.namespace, {"spec": {"replicas": replicas}},
                _content_type="application/merge-patch+json",
            )  # fmt: skip
        except Exception as exc:  # the next tick retries
            self.scale_failures += 1
            log.warning("could not scale deployment %s/%s to %d: %s", self.namespace,
                        v.service, replicas, exc)  # fmt: skip
            return
        self._asked[key] = (replicas, now)
        log.info("scaled deployment %s/%s to %d", self.namespace, v.service, replicas)

    async def deploy(self, spec: DeploySpec) -> None:
        raise RuntimeError(
            f"version endpoint {spec.key}: in Kubernetes mode, apply a Deployment and a "
            "Service with its labels instead (docs/kubernetes.md)"
        )

    async def undeploy(self, key: str) -> None:
        raise RuntimeError(f"version endpoint {key}: delete its Deployment and Service instead")

    def logs(self, key: str) -> list[str]:
        return []

    async def close(self) -> None:
        return None
