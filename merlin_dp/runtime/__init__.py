"""The runtime interface: where version endpoints' replicas run.

The controller deploys, scales and undeploys through a :class:`Runtime`; the autoscaler
scales through the same interface. :mod:`~merlin_dp.runtime.local` (processes on this
machine) and :mod:`~merlin_dp.runtime.kubernetes` (Deployments' scale subresource)
implement it. A
runtime reports what happens to replicas as :class:`RuntimeEvent` values through the
callback it is given, and answers :meth:`Runtime.replicas` with its current view; it
never decides routing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

ReplicaState = Literal["starting", "ready", "unready", "draining", "stopped"]
EventKind = Literal[
    "replica_started", "replica_ready", "replica_unready", "replica_exited",
    "replica_stopped", "failed", "scaled",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeploySpec:
    """What a runtime needs to run one version endpoint."""

    project: str
    model: str
    version: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    protocol: str = "HTTP_JSON"
    artifact: str = ""
    replicas: int = 1
    cpu_request: str = "500m"
    memory_request: str = "512Mi"
    ready_deadline_s: float = 60.0
    workdir: str = ""  # where the command runs (absolute); "": the controller's own cwd

    @property
    def key(self) -> str:
        return f"{self.project}/{self.model}/{self.version}"

    @property
    def full_name(self) -> str:
        return f"{self.model}-{self.version}"


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    id: str
    address: str  # host:port
    state: ReplicaState
    pid: int | None = None
    restarts: int = 0
    ready_after: float | None = None  # seconds from being asked for to first ready
    metrics_address: str = ""  # host:port of /metrics when not the traffic address (UPI_V1)


@dataclass(frozen=True, slots=True)
class RuntimeEvent:
    key: str  # project/model/version
    kind: EventKind
    message: str = ""
    replica: str = ""


OnEvent = Callable[[RuntimeEvent], None]


class Runtime(Protocol):
    async def deploy(self, spec: DeploySpec) -> None:
        """Start (or replace) a version endpoint's replicas; returns once started."""

    async def scale(self, key: str, replicas: int) -> None:
        """Set the desired replica count; scale-down drains before it stops."""

    async def undeploy(self, key: str) -> None:
        """Drain and stop every replica of the version endpoint."""

    def replicas(self, key: str) -> list[ReplicaInfo]:
        """The runtime's current view of a version endpoint's replicas."""

    def logs(self, key: str) -> list[str]:
        """Paths of the replicas' log files (newest last)."""

    async def close(self) -> None:
        """Stop everything this runtime started."""
