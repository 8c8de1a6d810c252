"""The local runtime with real replica processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from controller.runtime import DeploySpec, ReplicaInfo, RuntimeEvent
from controller.runtime.local import LocalRuntime, LocalTimings
from tests.conftest import ROOT

EXAMPLE = (sys.executable, str(ROOT / "examples" / "custom_model.py"))
FAST = LocalTimings(probe_interval=0.05, liveness_interval=0.3, drain_seconds=0.2,
                    stop_grace_seconds=3, backoff_base=0.1)  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.events: list[RuntimeEvent] = []

    def __call__(self, event: RuntimeEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[tuple[LocalRuntime, Recorder]]:
    rec = Recorder()
    rt = LocalRuntime(tmp_path / "state", rec, FAST)
    yield rt, rec
    await rt.close()


def spec(replicas: int = 1, **over: object) -> DeploySpec:
    base = DeploySpec(project="fraud", model="scorer", version="1", command=EXAMPLE,
                      replicas=replicas, ready_deadline_s=20)  # fmt: skip
    return DeploySpec(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **over})


async def until(cond: object, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held")


def ready(rt: LocalRuntime, key: str = "fraud/scorer/1") -> list[str]:
    return [r.address for r in rt.replicas(key) if r.state == "ready"]


async def predict(address: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://{address}/v1/models/scorer-1:predict", json={"instances": [[1, 2]]}
        ) as resp,
    ):
        assert resp.status == 200
        body: dict[str, object] = await resp.json()
        return body


async def test_replicas_start_under_the_contract_and_become_ready(
    runtime: tuple[LocalRuntime, Recorder],
) -> None:
    rt, rec = runtime
    await rt.deploy(spec(replicas=2))
    await until(lambda: len(ready(rt)) == 2)
    body = await predict(ready(rt)[0])
    assert body["model"] == "scorer-1"  # CARAML_MODEL_FULL_NAME reached the process
    assert rec.kinds().count("replica_ready") == 2
    assert len(rt.logs("fraud/scorer/1")) == 2


async def test_killed_replica_is_restarted(runtime: tuple[LocalRuntime, Recorder]) -> None:
    rt, rec = runtime
    await rt.deploy(spec())
    await until(lambda: len(ready(rt)) == 1)
    pid = rt.replicas("fraud/scorer/1")[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: "replica_exited" in rec.kinds())
    await until(lambda: len(ready(rt)) == 1 and rt.replicas("fraud/scorer/1")[0].pid != pid)
    assert rt.replicas("fraud/scorer/1")[0].restarts == 1
    await predict(ready(rt)[0])


async def test_never_ready_version_fails_with_its_reason(
    runtime: tuple[LocalRuntime, Recorder],
) -> None:
    rt, rec = runtime
    crash = (
        sys.executable,
        "-c",
        "import sys; print('loading weights: file not found'); sys.exit(3)",
    )
    await rt.deploy(spec(command=crash, ready_deadline_s=1.5))
    await until(lambda: "failed" in rec.kinds())
    failure = next(e for e in rec.events if e.kind == "failed")
    assert "exit code 3" in failure.message
    assert "loading weights: file not found" in failure.message
    assert rt.replicas("fraud/scorer/1") == []


async def test_scale_up_and_down_drains_then_stops(runtime: tuple[LocalRuntime, Recorder]) -> None:
    rt, rec = runtime
    await rt.deploy(spec())
    await until(lambda: len(ready(rt)) == 1)
    await rt.scale("fraud/scorer/1", 3)
    await until(lambda: len(ready(rt)) == 3)
    pids = {r.pid for r in rt.replicas("fraud/scorer/1")}
    await rt.scale("fraud/scorer/1", 1)
    await until(lambda: len(rt.replicas("fraud/scorer/1")) == 1)
    # Each stopped replica was reported draining before it was stopped.
    draining = [e.replica for e in rec.events if e.message == "draining"]
    stopped = [e.replica for e in rec.events if e.kind == "replica_stopped"]
    assert len(draining) == 2 and set(draining) == set(stopped)
    for pid in pids - {r.pid for r in rt.replicas("fraud/scorer/1")}:
        assert pid is not None and not Path(f"/proc/{pid}").exists()


async def test_undeploy_leaves_no_process(runtime: tuple[LocalRuntime, Recorder]) -> None:
    rt, _ = runtime
    await rt.deploy(spec(replicas=2))
    await until(lambda: len(ready(rt)) == 2)
    pids = [r.pid for r in rt.replicas("fraud/scorer/1")]
    await rt.undeploy("fraud/scorer/1")  # returns at once; the drain is the runtime's
    await until(lambda: rt.replicas("fraud/scorer/1") == [])
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


async def crashed_run(tmp_path: Path, rec: Recorder) -> tuple[LocalRuntime, ReplicaInfo]:
    """A runtime with one ready replica whose supervisor then "crashes": nothing stops
    the replica; a second runtime on the same state directory finds it."""
    first = LocalRuntime(tmp_path / "state", rec, FAST)
    await first.deploy(spec())
    await until(lambda: len(ready(first)) == 1)
    [orphan] = first.replicas("fraud/scorer/1")
    return first, orphan


async def test_orphans_from_a_crashed_run_serve_until_the_new_replicas_are_ready(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    first, orphan = await crashed_run(tmp_path, rec)
    second = LocalRuntime(tmp_path / "state", rec, FAST)
    try:
        assert second.reap_orphans() == 1
        # Gateways still route to it: it stays a ready replica of its version, alive...
        assert [(r.address, r.state) for r in second.replicas("fraud/scorer/1")] == [
            (orphan.address, "ready")
        ]
        await asyncio.sleep(0.3)
        assert _alive(orphan.pid)
        # ...until this run's own replica is ready; then it leaves the view, and dies.
        await second.deploy(spec())
        await until(lambda: ready(second) not in ([], [orphan.address]))
        await until(lambda: orphan.address not in ready(second))
        await until(lambda: not _alive(orphan.pid))
        assert any(e.message == "an earlier run's replicas hand over" for e in rec.events)
    finally:
        await second.close()
        await first.close()


def _alive(pid: int | None) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


async def test_redeploy_keeps_the_old_replicas_until_the_new_ones_are_ready(
    runtime: tuple[LocalRuntime, Recorder],
) -> None:
    rt, _ = runtime
    await rt.deploy(spec())
    await until(lambda: len(ready(rt)) == 1)
    old = ready(rt)[0]
    slow = (sys.executable, "-c", "import time, runpy, sys; time.sleep(1.5); "
            f"sys.argv = ['m']; runpy.run_path({EXAMPLE[1]!r}, run_name='__main__')")  # fmt: skip
    await rt.deploy(spec(command=slow))
    seen_gap = False
    for _ in range(100):
        now_ready = ready(rt)
        seen_gap = seen_gap or not now_ready
        if now_ready and old not in now_ready:
            break
        await asyncio.sleep(0.05)
    assert not seen_gap  # a ready replica at every moment
    assert ready(rt) and old not in ready(rt)
    ids = [r.id for r in rt.replicas("fraud/scorer/1")]
    assert len(set(ids)) == len(ids)


async def test_stopping_during_a_hand_over_stops_the_earlier_runs_replicas(
    tmp_path: Path,
) -> None:
    rec = Recorder()
    first, orphan = await crashed_run(tmp_path, rec)
    second = LocalRuntime(tmp_path / "state", rec, FAST)
    try:
        assert second.reap_orphans() == 1
        assert _alive(orphan.pid)
    finally:
        await second.close()  # before its own replicas (none) were ever ready
    await until(lambda: not _alive(orphan.pid))
    await first.close()
