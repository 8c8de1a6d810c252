"""Rollouts end to end with real processes: `merlin-dp controller` (reading the gateway's
signals), `merlin-dp gateway` following it, and replicas the controller's runtime starts
(tests/rollout_replica.py). Callers send a steady stream through the gateway while the
rollout decides by itself.

The tests share one controller and gateway, each with a model of its own (its versions,
rule, rollout, signals and audit entries); the one that kills its controller has its own."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from merlin_dp.common.net import free_port
from tests.conftest import ROOT, Proc, wait_port
from tests.test_controller_api import Api
from tests.test_controller_process import cli
from tests.test_controller_process import start_controller as controller_process

# Rollouts here are judged on live latencies and error counts against real clocks: a
# neighbour's CPU load would be read as the candidate's. The test command runs these alone.
pytestmark = pytest.mark.alone

REPLICA = [sys.executable, "-m", "tests.rollout_replica"]
# A plan a test can watch end in seconds: short steps, margins a few hundred answers
# can decide, and a latency margin wide enough for two processes on a busy machine.
FAST = {"steps": [20, 50], "step_seconds": 2,
        "analysis": {"min_samples": 30, "settle_seconds": 1, "error_rate_margin": 0.04,
                     "mismatch_rate_margin": 0.05, "latency_slowdown": 3.0}}  # fmt: skip


@dataclass
class Traffic:
    """What callers saw: per answering version, statuses counted."""

    answers: dict[str, dict[int, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, version: str, status: int) -> None:
        by_status = self.answers.setdefault(version, {})
        by_status[status] = by_status.get(status, 0) + 1

    def failed(self, version: str | None = None) -> int:
        return sum(n for v, codes in self.answers.items() if version in (None, v)
                   for code, n in codes.items() if code >= 400)  # fmt: skip

    def served(self, version: str) -> int:
        return sum(self.answers.get(version, {}).values())


@dataclass
class Processes:
    """A controller and a gateway following it."""

    tmp: Path
    port: int
    gateway_port: int
    admin: int
    controller: Proc
    gateway: Proc

    def stop(self) -> None:
        self.gateway.stop()
        self.controller.stop()


@dataclass
class Stack:
    """One test's model (fraud/<model>) on a controller and gateway."""

    procs: Processes
    api: Api
    model: str

    @property
    def tmp(self) -> Path:
        return self.procs.tmp

    @property
    def port(self) -> int:
        return self.procs.port

    @property
    def gateway_port(self) -> int:
        return self.procs.gateway_port

    @property
    def controller(self) -> Proc:
        return self.procs.controller

    @property
    def base(self) -> str:
        return f"/v1/projects/fraud/models/{self.model}"

    @property
    def host(self) -> str:
        return f"{self.model}.fraud.localhost"

    def restart_controller(self) -> None:
        p = self.procs
        p.controller = start_controller(p.tmp, p.port, p.admin)


def start_controller(tmp: Path, port: int, admin: int) -> Proc:
    """`merlin-dp controller`, reading the gateway's signals from its admin port."""
    return controller_process(tmp, tmp / "state", port,
                              "--gateway-admin", f"http://127.0.0.1:{admin}")  # fmt: skip


def start_processes(tmp: Path) -> Processes:
    port, gateway_port, admin = free_port(), free_port(), free_port()
    controller = start_controller(tmp, port, admin)
    gateway = Proc(
        [sys.executable, "-m", "merlin_dp", "gateway", "--controller",
         f"http://127.0.0.1:{port}", "--listen", f"127.0.0.1:{gateway_port}",
         "--admin", f"127.0.0.1:{admin}"],
        gateway_port, tmp / "gateway.log",
    )  # fmt: skip
    try:
        wait_port(gateway_port)
    except BaseException:
        gateway.stop()
        controller.stop()
        raise
    return Processes(tmp, port, gateway_port, admin, controller, gateway)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """The module's controller and gateway (started once: about 2 s a test)."""
    procs = start_processes(tmp_path_factory.mktemp("rollouts"))
    try:
        yield procs
    finally:
        procs.stop()


MODELS = (f"scorer-{n}" for n in itertools.count(1))


@pytest.fixture
async def stack(shared: Processes) -> AsyncIterator[Stack]:
    """A model of the test's own on the module's controller and gateway."""
    api = Api(f"http://127.0.0.1:{shared.port}")
    try:
        yield Stack(shared, api, next(MODELS))
    finally:
        await api.session.close()


@pytest.fixture
async def own_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A controller and gateway of the test's own (it kills the controller)."""
    procs = start_processes(tmp_path)
    api = Api(f"http://127.0.0.1:{procs.port}")
    try:
        yield Stack(procs, api, "scorer")
    finally:
        await api.session.close()
        procs.stop()


async def deploy(stack: Stack, version: str, **env: str) -> None:
    spec = {"type": "custom", "command": REPLICA, "workdir": str(ROOT),
            "env_vars": env, "ready_deadline_seconds": 60,
            "resource_request": {"min_replica": 1, "max_replica": 1}}  # fmt: skip
    path = f"{stack.base}/versions/{version}/endpoint"
    status, body, _ = await stack.api.call("PUT", path, spec)
    assert status == 202, body
    deadline = time.monotonic() + 60
    while body.get("status") != "running":
        assert time.monotonic() < deadline, f"version {version} never ran: {body}"
        await asyncio.sleep(0.1)
        _, body, _ = await stack.api.call("GET", path)


async def serve_baseline(stack: Stack, candidate_env: dict[str, str]) -> None:
    await deploy(stack, "1")
    await deploy(stack, "2", **candidate_env)
    rule = {"rule": {"destinations": [{"version": "1", "weight": 100}],
                     "sticky": {"header": "X-User"}}}  # fmt: skip
    status, body, _ = await stack.api.call("PUT", f"{stack.base}/endpoint", rule)
    assert status == 201, body


@contextlib.asynccontextmanager
async def callers(stack: Stack, per_second: float = 60) -> AsyncIterator[Traffic]:
    """A steady stream of predictions through the gateway, one caller id each."""
    seen = Traffic()
    url = f"http://127.0.0.1:{stack.gateway_port}/v1/predict"

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        headers = {"Host": stack.host, "X-User": f"user-{n % 200}"}
        try:
            async with session.post(url, json={"instances": [[1, 2, n % 7]]},
                                    headers=headers) as r:  # fmt: skip
                await r.read()
                seen.add(r.headers.get("X-Model-Version", "?"), r.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            seen.errors.append(repr(exc))

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            pending: set[asyncio.Task[None]] = set()
            n = 0
            try:
                while True:
                    n += 1
                    task = asyncio.ensure_future(one(session, n))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    await asyncio.sleep(1 / per_second)
            finally:
                await asyncio.gather(*pending, return_exceptions=True)

    task = asyncio.ensure_future(run())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def rollout(stack: Stack, timeout: float, until: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body, _ = await stack.api.call("GET", f"{stack.base}/endpoint/rollout")
        assert status == 200, body
        if until(body):
            return body
        await asyncio.sleep(0.25)
    raise AssertionError(f"the rollout did not get there in {timeout} s: {body}")


def ended(body: dict[str, Any]) -> bool:
    return body["phase"] not in ("shadow", "canary")


async def test_a_good_candidate_promotes_itself(stack: Stack) -> None:
    await serve_baseline(stack, {})
    async with callers(stack) as seen:
        status, body, _ = await stack.api.call(
            "POST", f"{stack.base}/endpoint:rollout", {"candidate": "2", **FAST}
        )
        assert status == 201, body
        assert body["phase"] == "shadow"
        done = await rollout(stack, 90, ended)
        await asyncio.sleep(1)
    assert done["phase"] == "promoted", done
    actions = [d["action"] for d in done["decisions"]]
    assert actions == ["start", "step", "step", "promote"], done["decisions"]
    # Every step is a revision in the history, with the rule it routed.
    _, history, _ = await stack.api.call("GET", f"{stack.base}/endpoint/history")
    rules = {h["revision"]: h["rule"] for h in history["history"]}
    revisions = [d["revision"] for d in done["decisions"]]
    assert rules[revisions[0]]["mirror"]["version"] == "2"
    assert [d["weight"] for d in rules[revisions[1]]["destinations"]] == [80, 20]
    assert [d["weight"] for d in rules[revisions[2]]["destinations"]] == [50, 50]
    assert rules[revisions[3]]["destinations"] == [{"version": "2", "weight": 100}]
    _, endpoint, _ = await stack.api.call("GET", f"{stack.base}/endpoint")
    assert endpoint["rule"]["destinations"] == [{"version": "2", "weight": 100}]
    assert seen.failed() == 0 and not seen.errors, (seen.answers, seen.errors[:3])
    assert seen.served("2") > 0
    # The audit log has every move.
    _, audit, _ = await stack.api.call("GET", "/v1/audit")
    mine = [e["action"] for e in audit["entries"] if e["target"] == f"fraud/{stack.model}"]
    moves = [action for action in mine if action.startswith("rollout")]
    assert moves == ["rollout_start", "rollout_step", "rollout_step", "rollout_promote"]


async def test_a_failing_canary_is_rolled_back_and_fails_only_its_own_answers(
    stack: Stack,
) -> None:
    await serve_baseline(stack, {"ROLLOUT_FAIL_EVERY": "20"})  # 5% server errors
    # Twice the callers: the rollback waits on the candidate's answers counted.
    async with callers(stack, per_second=120) as seen:
        # A margin well under the 5% it fails, so a few hundred answers decide.
        analysis = {**FAST["analysis"], "error_rate_margin": 0.02}  # type: ignore[dict-item]
        plan = {"candidate": "2", **FAST, "shadow": False, "analysis": analysis}
        status, body, _ = await stack.api.call("POST", f"{stack.base}/endpoint:rollout", plan)
        assert status == 201, body
        done = await rollout(stack, 90, ended)
        await asyncio.sleep(1)
    assert done["phase"] == "rolled_back", done
    assert "error rate" in done["decisions"][-1]["reason"]
    _, endpoint, _ = await stack.api.call("GET", f"{stack.base}/endpoint")
    assert endpoint["rule"]["destinations"] == [{"version": "1", "weight": 100}]
    # Callers saw failures only in answers the candidate gave itself.
    assert seen.failed() == seen.failed("2") > 0, seen.answers
    assert not seen.errors, seen.errors[:3]


async def test_a_candidate_that_predicts_differently_stops_in_the_shadow(stack: Stack) -> None:
    await serve_baseline(stack, {"ROLLOUT_DIFFER_EVERY": "10"})
    async with callers(stack) as seen:
        status, body, _ = await stack.api.call(
            "POST", f"{stack.base}/endpoint:rollout", {"candidate": "2", **FAST}
        )
        assert status == 201, body
        done = await rollout(stack, 90, ended)
    assert done["phase"] == "rolled_back", done
    assert [d["action"] for d in done["decisions"]] == ["start", "rollback"]
    assert "mismatch rate" in done["decisions"][-1]["reason"]
    assert seen.served("2") == 0 and seen.failed() == 0, seen.answers


async def test_the_controller_killed_mid_rollout_resumes_where_it_was(own_stack: Stack) -> None:
    stack = own_stack
    await serve_baseline(stack, {})
    plan_file = stack.tmp / "plan.yaml"
    plan_file.write_text(json.dumps({**FAST, "steps": [10, 50]}))
    async with callers(stack) as seen:
        # Started with the CLI, a plan file and a flag over it.
        start = ("start", "fraud/scorer", "2", "--plan-file", str(plan_file),
                 "--step-seconds", "5")  # fmt: skip
        out = await asyncio.to_thread(cli, stack.port, "rollout", *start)
        assert out.returncode == 0, out.stderr
        assert "fraud/scorer: 1 -> 2: shadowing all traffic" in out.stdout
        at_step = await rollout(stack, 90, lambda b: b["phase"] == "canary")
        assert at_step["plan"]["step_seconds"] == 5
        assert at_step["weight"] == 10
        stack.controller.kill(signal.SIGKILL)
        stack.controller.popen.wait(5)
        await asyncio.sleep(1)
        stack.restart_controller()
        resumed = await rollout(stack, 30, lambda b: True)
        assert resumed["phase"] == "canary" and resumed["weight"] == 10, resumed
        assert resumed["shadow"]["compared"] == at_step["shadow"]["compared"]
        out = await asyncio.to_thread(cli, stack.port, "rollout", "status", "fraud/scorer")
        assert out.returncode == 0, out.stderr
        assert "10% to candidate, step 1 of 2 (10, 50)" in out.stdout
        assert "shadow passed" in out.stdout
        done = await rollout(stack, 90, ended)
        await asyncio.sleep(1)
    assert done["phase"] == "promoted", done
    assert [d["weight"] for d in done["decisions"]] == [0, 10, 50, 100]
    assert seen.failed() == 0, seen.answers


async def test_an_abort_under_load_fails_no_request(stack: Stack) -> None:
    await serve_baseline(stack, {})
    plan = {"candidate": "2", **FAST, "shadow": False, "steps": [50], "step_seconds": 600}
    async with callers(stack, per_second=100) as seen:
        status, body, _ = await stack.api.call("POST", f"{stack.base}/endpoint:rollout", plan)
        assert status == 201, body
        await asyncio.sleep(3)
        status, body, _ = await stack.api.call("POST", f"{stack.base}/endpoint/rollout:abort")
        assert status == 200 and body["phase"] == "aborted", body
        await asyncio.sleep(2)
        before = seen.served("2")
        await asyncio.sleep(1)
    assert seen.served("2") == before > 0, seen.answers
    assert seen.failed() == 0 and not seen.errors, (seen.answers, seen.errors[:3])
    _, endpoint, _ = await stack.api.call("GET", f"{stack.base}/endpoint")
    assert endpoint["rule"]["destinations"] == [{"version": "1", "weight": 100}]
    # A manual change is refused while a rollout runs, and allowed once it ended.
    switch = {"to_version": "2"}
    status, body, _ = await stack.api.call("POST", f"{stack.base}/endpoint:switch", switch)
    assert status == 200, body
