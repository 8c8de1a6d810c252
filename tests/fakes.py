"""The fakes the autoscaler's tests share, in one place (Knative's style): a runtime that
records what it was asked, and a clock the test moves. Everything else in the tests is
real: sockets, processes, servers."""

from __future__ import annotations

from merlin_dp.runtime import DeploySpec, ReplicaInfo


class FakeRuntime:
    """Replicas as the scaler sees them; ``scale()`` records what it was asked."""

    def __init__(self, replicas: list[ReplicaInfo]) -> None:
        self.view = replicas
        self.asked: list[int] = []

    async def deploy(self, spec: DeploySpec) -> None: ...

    async def scale(self, key: str, replicas: int) -> None:
        self.asked.append(replicas)

    async def undeploy(self, key: str) -> None: ...

    def replicas(self, key: str) -> list[ReplicaInfo]:
        return self.view

    def logs(self, key: str) -> list[str]:
        return []

    async def close(self) -> None: ...


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
