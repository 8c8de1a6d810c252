"""The rollout API over real HTTP: what it refuses (and that nothing changes then), the
steering operations, the refusal of manual routing while a rollout runs, the webhook,
the metrics, and a rollout kept in the Redis store across controllers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from merlin_dp.autoscaler.collector import GatewaySignals
from merlin_dp.controller.rollouts import RolloutDriver, attach_rollouts
from merlin_dp.controller.server import ControllerConfig, start_controller
from tests.conftest import RedisServer
from tests.test_controller_api import BASE, Api, deployment

ONE = {"rule": {"destinations": [{"version": "1", "weight": 100}]}}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """A controller with two running versions and version 1 taking all traffic; its
    rollouts read gateways' signals (none here: nothing decides by itself)."""
    config = ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.2)
    controller, runner, port = await start_controller(config)
    driver = attach_rollouts(controller, GatewaySignals([]))
    a = Api(f"http://127.0.0.1:{port}")
    a.driver = driver  # type: ignore[attr-defined]
    try:
        for v in ("1", "2"):
            assert (await a.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment()))[0] == 202
        for v in ("1", "2"):
            await a.wait_status(v, "running")
        assert (await a.call("PUT", f"{BASE}/endpoint", ONE))[0] == 201
        yield a
    finally:
        await a.session.close()
        await driver.close()
        await runner.cleanup()
        await controller.close()


async def rule(api: Api) -> dict[str, Any]:
    _, body, _ = await api.call("GET", f"{BASE}/endpoint")
    return dict(body["rule"])


async def test_bad_plans_are_refused_whole(api: Api) -> None:
    before = await rule(api)
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout",
                                     {"candidate": "2", "steps": [50, 20]})  # fmt: skip
    assert status == 422, body
    assert body["error"]["fields"][0]["path"] == "steps"
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout",
                                     {"candidate": "2", "analysis": {"alpha": 2}})  # fmt: skip
    assert status == 422 and body["error"]["fields"][0]["path"] == "analysis.alpha"
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout", {"candidate": "9"})
    assert status == 409 and "not deployed" in body["error"]["message"], body
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout", {"candidate": "1"})
    assert status == 409 and "already takes all traffic" in body["error"]["message"]
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout", {"candidate": "2"},
                                     **{"If-Match": "999"})  # fmt: skip
    assert status == 412, body
    status, body, _ = await api.call("GET", f"{BASE}/endpoint/rollout")
    assert status == 404
    assert await rule(api) == before


async def test_a_split_rule_is_not_a_starting_point(api: Api) -> None:
    split = {"rule": {"destinations": [{"version": "1", "weight": 90},
                                       {"version": "2", "weight": 10}]}}  # fmt: skip
    assert (await api.call("PUT", f"{BASE}/endpoint", split))[0] == 200
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout", {"candidate": "2"})
    assert status == 409 and "splits it" in body["error"]["message"], body


async def test_steering_and_manual_changes_while_it_runs(api: Api) -> None:
    status, body, headers = await api.call("POST", f"{BASE}/endpoint:rollout",
                                           {"candidate": "2"})  # fmt: skip
    assert status == 201, body
    assert body["phase"] == "shadow" and body["baseline"] == "1"
    assert (await rule(api))["mirror"]["version"] == "2"
    assert headers["ETag"] == f'"{body["decisions"][0]["revision"]}"'
    # A second rollout, or a hand on the rule, is refused while one runs.
    status, body, _ = await api.call("POST", f"{BASE}/endpoint:rollout", {"candidate": "2"})
    assert status == 409 and "abort it first" in body["error"]["message"]
    for method, path, payload in (("PUT", "/endpoint", ONE), ("POST", "/endpoint:switch", {}),
                                  ("POST", "/endpoint:rollback", {}),
                                  ("DELETE", "/endpoint", None)):  # fmt: skip
        status, body, _ = await api.call(method, BASE + path, payload)
        assert status == 409 and "rollout" in body["error"]["message"], (path, body)
    status, body, _ = await api.call("POST", f"{BASE}/endpoint/rollout:resume")
    assert status == 409 and "not paused" in body["error"]["message"]
    status, body, _ = await api.call("POST", f"{BASE}/endpoint/rollout:pause")
    assert status == 200 and body["paused"] is True
    assert body["decisions"][-1]["reason"] == "paused by anonymous"
    assert (await rule(api))["mirror"]["version"] == "2"  # traffic as it was
    status, body, _ = await api.call("POST", f"{BASE}/endpoint/rollout:resume")
    assert status == 200 and body["paused"] is False
    status, body, _ = await api.call("POST", f"{BASE}/endpoint/rollout:abort")
    assert status == 200 and body["phase"] == "aborted"
    after = await rule(api)
    assert after["destinations"] == ONE["rule"]["destinations"] and after["mirror"] is None
    status, body, _ = await api.call("POST", f"{BASE}/endpoint/rollout:abort")
    assert status == 409 and "has ended (aborted)" in body["error"]["message"]
    # Ended: the rule is the user's again.
    assert (await api.call("POST", f"{BASE}/endpoint:switch", {}))[0] == 200
    _, audit, _ = await api.call("GET", "/v1/audit")
    actions = [e["action"] for e in audit["entries"] if e["action"].startswith("rollout")]
    assert actions == ["rollout_start", "rollout_pause", "rollout_resume", "rollout_abort"]
    # The metrics say what happened.
    async with api.session.get(api.url + "/metrics") as resp:
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    phases = {s.labels["phase"]: s.value for s in families["merlin_rollout_phase"].samples}
    assert phases["aborted"] == 1 and phases["shadow"] == 0
    decisions = {s.labels["result"]: s.value for s in families["merlin_rollout_decisions"].samples
                 if s.name.endswith("_total")}  # fmt: skip
    assert decisions == {"started": 1, "paused": 1, "resumed": 1, "aborted": 1}


async def test_a_refusing_webhook_pauses_the_rollout(api: Api) -> None:
    answers = [503, 200]
    calls: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        calls.append(await request.json())
        return web.json_response({}, status=answers[min(len(calls), len(answers)) - 1])

    app = web.Application()
    app.router.add_post("/check", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    driver: RolloutDriver = api.driver  # type: ignore[attr-defined]
    try:
        plan = {"candidate": "2", "shadow": False, "steps": [10, 50], "step_seconds": 1,
                "webhook": f"http://127.0.0.1:{port}/check"}  # fmt: skip
        assert (await api.call("POST", f"{BASE}/endpoint:rollout", plan))[0] == 201
        # No traffic: nothing leans either way, so after a second the step is due.
        for _ in range(100):
            _, body, _ = await api.call("GET", f"{BASE}/endpoint/rollout")
            if body["paused"]:
                break
            await asyncio.sleep(0.1)
        assert body["paused"] and "answered 503" in body["message"], body
        assert calls[0]["action"] == "step" and calls[0]["weight"] == 50
        assert body["weight"] == 10  # held where it was
        assert (await api.call("POST", f"{BASE}/endpoint/rollout:resume"))[0] == 200
        for _ in range(100):
            _, body, _ = await api.call("GET", f"{BASE}/endpoint/rollout")
            if body["weight"] == 50:
                break
            await asyncio.sleep(0.1)
        assert body["weight"] == 50 and len(calls) == 2, (body, calls)
        assert driver.decisions.get("paused") == 1
    finally:
        await runner.cleanup()


async def test_a_rollout_lives_in_the_redis_store(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A second controller on the same Redis store finds the rollout where the first
    left it."""
    url = redis_server.url
    config = ControllerConfig(state_dir=tmp_path / "a", port=0, drain_seconds=0.2, store=url)
    first, runner, port = await start_controller(config)
    driver = attach_rollouts(first, GatewaySignals([]))
    a = Api(f"http://127.0.0.1:{port}")
    try:
        for v in ("1", "2"):
            await a.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment())
        for v in ("1", "2"):
            await a.wait_status(v, "running")
        await a.call("PUT", f"{BASE}/endpoint", ONE)
        status, started, _ = await a.call("POST", f"{BASE}/endpoint:rollout",
                                          {"candidate": "2", "shadow": False})  # fmt: skip
        assert status == 201, started
    finally:
        await a.session.close()
        await driver.close()
        await runner.cleanup()
        await first.close()
    second_config = ControllerConfig(state_dir=tmp_path / "b", port=0, drain_seconds=0.2,
                                     store=url)  # fmt: skip
    second, runner, port = await start_controller(second_config)
    b = Api(f"http://127.0.0.1:{port}")
    try:
        status, body, _ = await b.call("GET", f"{BASE}/endpoint/rollout")
        assert status == 200 and body["phase"] == "canary" and body["weight"] == 1
        assert body["started"] == started["started"]
        assert body["decisions"] == started["decisions"]
    finally:
        await b.session.close()
        await runner.cleanup()
        await second.close()
