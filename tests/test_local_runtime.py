"""The local runtime with real replica processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from merlin_dp.common.net import free_port
from merlin_dp.runtime import DeploySpec, ReplicaInfo, RuntimeEvent
from merlin_dp.runtime.local import LocalRuntime, LocalTimings
from tests.conftest import ROOT
from tests.test_controller_process import HELD_CLI

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


async def test_a_crash_loop_fails_before_the_deadline(
    runtime: tuple[LocalRuntime, Recorder],
) -> None:
    rt, rec = runtime
    crash = (sys.executable, "-c", "import sys; print('no weights here'); sys.exit(5)")
    await rt.deploy(spec(command=crash, ready_deadline_s=3600))
    await until(lambda: "failed" in rec.kinds())  # long before the deadline
    failure = next(e for e in rec.events if e.kind == "failed")
    assert failure.message.startswith("crash loop: 3 replica starts ended within 10 s each")
    assert "exit code 5" in failure.message and "no weights here" in failure.message
    assert rec.kinds().count("replica_exited") == 3  # no start after the third exit
    assert rt.replicas("fraud/scorer/1") == []


async def test_a_replica_that_never_gets_ready_fails_at_its_deadline(
    runtime: tuple[LocalRuntime, Recorder],
) -> None:
    rt, rec = runtime
    quiet = (sys.executable, "-c", "import time; print('warming up', flush=True); time.sleep(60)")
    await rt.deploy(spec(command=quiet, ready_deadline_s=1))
    await until(lambda: "failed" in rec.kinds())
    failure = next(e for e in rec.events if e.kind == "failed")
    assert failure.message.startswith("no replica became ready within 1 s")
    assert "warming up" in failure.message
    assert rt.replicas("fraud/scorer/1") == []


async def test_the_command_runs_in_its_workdir(
    runtime: tuple[LocalRuntime, Recorder], tmp_path: Path
) -> None:
    rt, rec = runtime
    app = tmp_path / "app"
    app.mkdir()
    (app / "serve.py").write_text(
        f"import runpy\nrunpy.run_path({EXAMPLE[1]!r}, run_name='__main__')\n"
    )
    await rt.deploy(spec(command=(sys.executable, "serve.py"), workdir=str(app)))
    await until(lambda: len(ready(rt)) == 1)
    await rt.deploy(spec(version="2", command=EXAMPLE, workdir=str(tmp_path / "gone")))
    await until(lambda: "failed" in rec.kinds())
    failure = next(e for e in rec.events if e.kind == "failed")
    assert f"its working directory {tmp_path / 'gone'} does not exist here" in failure.message


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


async def test_an_orphan_whose_command_line_changed_is_still_found(tmp_path: Path) -> None:
    """Orphans were known by pid and command line only: a replica whose command line
    changed after it was recorded (a shell that execs its server, a server that sets its
    process title) counted as gone, and ran on unrecorded."""
    rec = Recorder()
    first = LocalRuntime(tmp_path / "state", rec, FAST)
    shell = ("/bin/sh", "-c", f"sleep 0.3; exec {sys.executable} {EXAMPLE[1]}")
    await first.deploy(spec(command=shell))
    await until(lambda: len(ready(first)) == 1)
    [orphan] = first.replicas("fraud/scorer/1")
    assert orphan.pid is not None and "/bin/sh" not in _cmdline(orphan.pid)
    second = LocalRuntime(tmp_path / "state", rec, FAST)
    try:
        assert second.reap_orphans() == 1
        await second.deploy(spec())
        await until(lambda: not _alive(orphan.pid))
    finally:
        await second.close()
        await first.close()
    assert list((tmp_path / "state" / "replicas").iterdir()) == []


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


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


# --- a controller killed again and again: no replica of any generation is left -----------

# A replica small enough that dozens of them start quickly on two shared cores: the
# contract's readiness and liveness, nothing else.
TINY_REPLICA = """
import http.server, json, os
name = os.environ["CARAML_MODEL_FULL_NAME"]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "alive"} if self.path == "/" else {"name": name}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
port = int(os.environ["CARAML_HTTP_PORT"])
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""
HANDING_OVER = "left running by an earlier run serve until the new ones are ready"
HANDED_OVER = "left running by an earlier run\n"  # "stopped N replica(s) left running by …"
SERVING = "controller API on"
VERSION = "/v1/projects/fraud/models/scorer/versions/1/endpoint"


def probe_pids(probe: str) -> set[int]:
    """Live processes whose environment carries this test's probe variable."""
    needle = f"LEAK_PROBE={probe}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.add(int(entry.name))
    return found


class ControllerProcess:
    """`merlin-dp controller` on a state directory, its log in a file of its own.

    ``held``: started ahead, it waits before main() until :meth:`go` (a test that starts
    controllers one after another lets the next import while the last one runs)."""

    def __init__(self, tmp: Path, state: Path, n: int, held: bool = False) -> None:
        self.port = free_port()
        self.log = tmp / f"controller-{n}.log"
        self._out = self.log.open("wb")
        self._argv = ["controller", "--state-dir", str(state), "--listen", f"127.0.0.1:{self.port}"]
        # Held: the CLI's main() in a Python started ahead (tests/test_controller_process.py),
        # its arguments sent at go().
        command = ["-c", HELD_CLI] if held else ["-m", "merlin_dp", *self._argv]
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
            stdin=subprocess.PIPE if held else None,
        )  # fmt: skip

    def go(self) -> None:
        """A held controller runs its command now."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(self._argv).encode() + b"\n")
        self.proc.stdin.close()

    def wait_log(self, *texts: str, timeout: float = 60) -> str:
        """Wait until the log says one of ``texts``; returns the log."""
        deadline = time.monotonic() + timeout
        while not any(t in (text := self.log.read_text()) for t in texts):
            assert self.proc.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.01)
        return text

    def call(self, method: str, path: str, body: object = None) -> dict[str, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer: dict[str, object] = json.loads(resp.read())
            return answer

    def wait_replicas(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.call("GET", VERSION)["replicas"]) != count:  # type: ignore[arg-type]
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self._out.close()


def test_a_controller_killed_during_hand_overs_leaves_no_replica_behind(tmp_path: Path) -> None:
    """Killed during a hand-over, a controller had already deleted the earlier run's pid
    records: that generation ran on under init, found by no later start (50 cycles left
    147 replica processes)."""
    state = tmp_path / "state"
    tiny = tmp_path / "tiny_replica.py"
    tiny.write_text(TINY_REPLICA)
    probe = uuid.uuid4().hex
    spec = {"type": "custom", "command": [sys.executable, str(tiny)],
            "env_vars": {"LEAK_PROBE": probe}, "ready_deadline_seconds": 60,
            "resource_request": {"min_replica": 2, "max_replica": 2}}  # fmt: skip
    records = state / "runtime" / "replicas"
    started: list[ControllerProcess] = []

    def start() -> ControllerProcess:
        # Held: it runs only at go(), the last one killed by then; started ahead, the next
        # one's interpreter starts while the last one runs (a cycle costs a controller's
        # start, not also a Python's).
        started.append(ControllerProcess(tmp_path, state, len(started), held=True))
        return started[-1]

    try:
        first = start()
        first.go()
        first.wait_log(SERVING)
        first.call("PUT", VERSION, spec)
        first.wait_replicas(2)
        assert len(probe_pids(probe)) == 2
        ctl = start()
        first.kill9()
        # Each next controller is killed once its hand-over has begun: at once, or a
        # little later (while it starts its own replicas, or once they run).
        for delay in (0, 0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 0):
            ctl.go()
            after = start()
            ctl.wait_log(HANDING_OVER, SERVING)
            time.sleep(delay)
            ctl.kill9()
            ctl = after
        last = ctl
        last.go()
        if HANDING_OVER in last.wait_log(HANDING_OVER, SERVING):
            last.wait_log(HANDED_OVER, timeout=120)  # its own ready, every earlier one stopped
        last.wait_replicas(2)
        assert len(probe_pids(probe)) == 2
        last.stop()
        assert last.proc.returncode == 0, last.log.read_text()
        assert probe_pids(probe) == set()
        assert list(records.iterdir()) == []
    finally:
        for ctl in started:
            if ctl.proc.poll() is None:
                ctl.kill9()
        for pid in probe_pids(probe):  # a failed run leaves nothing for the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
