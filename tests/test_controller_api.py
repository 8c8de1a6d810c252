"""The controller's API over real HTTP, with real replicas and a following gateway."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from merlin_dp.controller.server import ControllerConfig, start_controller
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import ControllerRouteSource
from merlin_dp.gateway.worker import GatewayWorker
from tests.conftest import ROOT
from tests.test_controller_auth import ControllerProcess

EXAMPLE = [sys.executable, str(ROOT / "examples" / "custom_model.py")]
BASE = "/v1/projects/fraud/models/scorer"


class Api:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(headers=headers)

    async def call(
        self, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Any, Any]:
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(body, (bytes, str)):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.url + path, **kwargs) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers

    async def wait_status(self, version: str, status: str, timeout: float = 30) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for _ in range(int(timeout / 0.1)):
            _, body, _ = await self.call("GET", f"{BASE}/versions/{version}/endpoint")
            if body.get("status") == status:
                return body
            await asyncio.sleep(0.1)
        raise AssertionError(f"version {version} never became {status}: {body}")


def deployment(**over: Any) -> dict[str, Any]:
    return {"type": "custom", "command": EXAMPLE, "ready_deadline_seconds": 30, **over}


@pytest.fixture
async def ctl(tmp_path: Path) -> AsyncIterator[Any]:
    config = ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.3)
    controller, runner, port = await start_controller(config)
    api = Api(f"http://127.0.0.1:{port}")
    api.controller = controller  # type: ignore[attr-defined]
    yield api
    await api.session.close()
    await runner.cleanup()
    await controller.close()


async def test_deploy_route_and_serve_through_a_following_gateway(ctl: Api) -> None:
    status, body, _ = await ctl.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    assert status == 202 and body["status"] == "pending"
    assert body["url"] == "http://scorer-1.fraud.localhost:8080"  # the default public port
    await ctl.call("PUT", f"{BASE}/versions/2/endpoint", deployment())
    v1 = await ctl.wait_status("1", "running")
    assert len(v1["replicas"]) == 1
    await ctl.wait_status("2", "running")
    rule = {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    status, body, headers = await ctl.call("PUT", f"{BASE}/endpoint", rule)
    assert status == 201, body
    assert headers["ETag"] == f'"{body["revision"]}"'
    assert (await ctl.call("GET", f"{BASE}/versions/1/endpoint"))[1]["status"] == "serving"
    assert (await ctl.call("GET", f"{BASE}/versions/2/endpoint"))[1]["status"] == "running"

    source = ControllerRouteSource(ctl.url)
    worker = GatewayWorker(GatewayConfig(port=0), source)
    await worker.start()
    try:
        for _ in range(100):
            if worker.ready and worker.proxy.table.revision == ctl.controller.state.revision:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{worker.port}/v1/predict"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={"instances": [[1, 2]]},
                              headers={"Host": "scorer.fraud.localhost"}) as resp:  # fmt: skip
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Model-Version"] == "1"
            # Blue-green switch, then rollback: the gateway follows each.
            status, body, _ = await ctl.call("POST", f"{BASE}/endpoint:switch")
            assert status == 200, body
            assert body["rule"]["destinations"] == [{"version": "2", "weight": 100}]
            await _until_gateway(worker, ctl)
            async with s.post(url, json={"instances": [[1, 2]]},
                              headers={"Host": "scorer.fraud.localhost"}) as resp:  # fmt: skip
                assert resp.headers["X-Model-Version"] == "2"
            status, body, _ = await ctl.call("POST", f"{BASE}/endpoint:rollback")
            assert status == 200 and body["rule"]["destinations"][0]["version"] == "1"
            await _until_gateway(worker, ctl)
            async with s.post(url, json={"instances": [[1, 2]]},
                              headers={"Host": "scorer.fraud.localhost"}) as resp:  # fmt: skip
                assert resp.headers["X-Model-Version"] == "1"
    finally:
        await worker.stop()
    _, history, _ = await ctl.call("GET", f"{BASE}/endpoint/history")
    assert [h["rule"]["destinations"][0]["version"] for h in history["history"]] == ["1", "2", "1"]


async def _until_gateway(worker: GatewayWorker, ctl: Api) -> None:
    for _ in range(100):
        if worker.proxy.table.revision == ctl.controller.state.revision:  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("gateway did not converge")


async def test_merlin_rules_refuse_with_409(ctl: Api) -> None:
    await ctl.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    # Pending can't be changed.
    status, body, _ = await ctl.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    assert status == 409 and "pending" in body["error"]["message"]
    # Only running versions receive traffic.
    rule = {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    status, body, _ = await ctl.call("PUT", f"{BASE}/endpoint", rule)
    assert status == 409 and "only running" in body["error"]["message"]
    await ctl.wait_status("1", "running")
    await ctl.call("PUT", f"{BASE}/versions/2/endpoint", deployment())
    status, body, _ = await ctl.call("PUT", f"{BASE}/versions/3/endpoint", deployment())
    assert status == 409 and "at most 2" in body["error"]["message"]
    assert (await ctl.call("PUT", f"{BASE}/endpoint", rule))[0] == 201
    # Serving can't be undeployed.
    status, body, _ = await ctl.call("DELETE", f"{BASE}/versions/1/endpoint")
    assert status == 409 and "serving" in body["error"]["message"]
    # A rule naming an undeployed version is refused whole: the old rule stays.
    bad = {
        "rule": {"destinations": [{"version": "1", "weight": 50}, {"version": "9", "weight": 50}]}
    }
    status, body, _ = await ctl.call("PUT", f"{BASE}/endpoint", bad)
    assert status == 409 and "9" in body["error"]["message"]
    _, now, _ = await ctl.call("GET", f"{BASE}/endpoint")
    assert now["rule"]["destinations"] == [{"version": "1", "weight": 100}]
    # Undeploying a running one works and frees a slot.
    await ctl.wait_status("2", "running")
    assert (await ctl.call("DELETE", f"{BASE}/versions/2/endpoint"))[0] == 200
    assert (await ctl.call("GET", f"{BASE}/versions/2/endpoint"))[1]["status"] == "terminated"


async def test_invalid_bodies_get_422_with_field_paths(ctl: Api) -> None:
    cases = [
        (f"{BASE}/versions/1/endpoint", {"type": "custom"}, "(body)", "needs a command"),
        (f"{BASE}/versions/1/endpoint",
         deployment(resource_request={"min_replica": 3, "max_replica": 1}),
         "resource_request", "above max_replica"),
        (f"{BASE}/versions/1/endpoint", deployment(autoscaling_policy={"metrics_type": "gpu"}),
         "autoscaling_policy.metrics_type", "Input should be"),
        (f"{BASE}/versions/1/endpoint", deployment(env_vars={"CARAML_HTTP_PORT": "1"}),
         "env_vars", "set by the platform"),
        (f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 90}]}},
         "rule", "sum to 100"),
        (f"{BASE}/endpoint", {"rule": {"destinations": []}}, "rule.destinations", "at least 1"),
        (f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 100}]}, "x": 1},
         "x", "Extra inputs"),
    ]  # fmt: skip
    for path, body, field, reason in cases:
        status, answer, _ = await ctl.call("PUT", path, body)
        assert status == 422, (body, answer)
        paths = [f["path"] for f in answer["error"]["fields"]]
        assert field in paths, (field, answer)
        assert reason in answer["error"]["message"], answer
    status, answer, _ = await ctl.call("PUT", f"{BASE}/endpoint", "{not json")
    assert status == 400 and answer["error"]["code"] == "bad_json"
    status, answer, _ = await ctl.call("GET", "/v1/projects/Bad_Name/models/x/endpoint")
    assert status == 422
    status, answer, _ = await ctl.call("GET", f"{BASE}/endpoint")
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, answer, _ = await ctl.call("PUT", f"{BASE}/endpoint", b"x" * (2 * 1024 * 1024))
    assert status == 413


async def test_if_match_stops_two_writers_overwriting_each_other(ctl: Api) -> None:
    for v in ("1", "2"):
        await ctl.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment())
    for v in ("1", "2"):
        await ctl.wait_status(v, "running")

    def rule(a: int, b: int) -> dict[str, Any]:
        dests = [{"version": "1", "weight": a}, {"version": "2", "weight": b}]
        return {"rule": {"destinations": dests}}

    _, first, _ = await ctl.call("PUT", f"{BASE}/endpoint", rule(100, 0))
    seen = first["revision"]
    # Both writers read revision `seen`; the first one's change lands, the second's is refused.
    ok, _, _ = await ctl.call("PUT", f"{BASE}/endpoint", rule(90, 10), **{"If-Match": f'"{seen}"'})
    stale, body, _ = await ctl.call(
        "PUT", f"{BASE}/endpoint", rule(50, 50), **{"If-Match": f'"{seen}"'}
    )
    assert (ok, stale) == (200, 412)
    assert body["error"]["code"] == "stale_revision"
    _, now, _ = await ctl.call("GET", f"{BASE}/endpoint")
    assert [d["weight"] for d in now["rule"]["destinations"]] == [90, 10]


async def test_failed_version_says_why(ctl: Api) -> None:
    crash = [sys.executable, "-c", "import sys; print('cannot load model.pkl'); sys.exit(2)"]
    await ctl.call("PUT", f"{BASE}/versions/1/endpoint",
                   deployment(command=crash, ready_deadline_seconds=1))  # fmt: skip
    body = await ctl.wait_status("1", "failed")
    assert "exit code 2" in body["message"] and "cannot load model.pkl" in body["message"]


async def test_tokens_scope_projects_and_access(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        "  - {name: ci, token: write-fraud-0001, access: write, projects: [fraud], host: true}\n"
        "  - {name: gateways, token: read-all-0001, access: read, projects: ['*']}\n"
    )
    config = ControllerConfig(state_dir=tmp_path / "s", port=0, tokens_file=tokens, runtime="none")
    controller, runner, port = await start_controller(config)
    url = f"http://127.0.0.1:{port}"
    anon, ci, gw = Api(url), Api(url, "write-fraud-0001"), Api(url, "read-all-0001")
    try:
        assert (await anon.call("GET", f"{BASE}/versions"))[0] == 401
        assert (await Api(url, "wrong-token-0").call("GET", f"{BASE}/versions"))[0] == 401
        assert (await ci.call("GET", f"{BASE}/versions"))[0] == 200
        assert (await ci.call("GET", "/v1/projects/pricing/models/x/versions"))[0] == 403
        assert (await ci.call("GET", "/v1/routes"))[0] == 403  # needs every project
        assert (await gw.call("GET", "/v1/routes"))[0] == 200
        status, body, _ = await gw.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
        assert status == 403 and "may not write" in body["error"]["message"]
        status, body, _ = await ci.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
        assert status == 202
        _, audit, _ = await gw.call("GET", "/v1/audit")
        assert audit["entries"][-1]["who"] == "ci"
        assert audit["entries"][-1]["action"] == "deploy"
        assert (await anon.call("GET", "/openapi.json"))[0] == 200
    finally:
        for api in (anon, ci, gw):
            await api.session.close()
        await runner.cleanup()
        await controller.close()


async def test_no_tokens_refuses_a_public_address(tmp_path: Path) -> None:
    config = ControllerConfig(state_dir=tmp_path / "s", host="0.0.0.0", port=0, runtime="none")
    with pytest.raises(SystemExit, match="refusing to serve"):
        await start_controller(config)


async def test_switch_and_rollback_under_load_fail_nothing(ctl: Api) -> None:
    for v in ("1", "2"):
        await ctl.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment())
    for v in ("1", "2"):
        await ctl.wait_status(v, "running")
    await ctl.call(
        "PUT", f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    )
    worker = GatewayWorker(GatewayConfig(port=0), ControllerRouteSource(ctl.url))
    await worker.start()
    await _until_gateway(worker, ctl)
    url = f"http://127.0.0.1:{worker.port}/v1/predict"
    failures: list[str] = []
    served: dict[str, int] = {}
    done = asyncio.Event()

    async def client(s: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with s.post(url, json={"instances": [[1]]},
                              headers={"Host": "scorer.fraud.localhost"}) as resp:  # fmt: skip
                await resp.read()
                if resp.status != 200:
                    failures.append(f"{resp.status}")
                else:
                    v = resp.headers["X-Model-Version"]
                    served[v] = served.get(v, 0) + 1

    try:
        async with aiohttp.ClientSession() as s:
            clients = [asyncio.ensure_future(client(s)) for _ in range(8)]
            for i in range(10):
                op = "endpoint:switch" if i % 2 == 0 else "endpoint:rollback"
                status, body, _ = await ctl.call("POST", f"{BASE}/{op}")
                assert status == 200, body
                await _until_gateway(worker, ctl)
                await asyncio.sleep(0.1)
            done.set()
            await asyncio.gather(*clients)
    finally:
        await worker.stop()
    assert failures == []
    assert served.get("1", 0) > 0 and served.get("2", 0) > 0
    # Ten changes, each one revision; rollback returned to the rule before each switch.
    _, history, _ = await ctl.call("GET", f"{BASE}/endpoint/history")
    assert [h["rule"]["destinations"][0]["version"] for h in history["history"]][-10:] == [
        "2",
        "1",
    ] * 5


async def test_switch_to_a_version_without_ready_replicas_is_refused(ctl: Api) -> None:
    await ctl.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    await ctl.wait_status("1", "running")
    await ctl.call(
        "PUT", f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    )
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]  # never ready
    await ctl.call("PUT", f"{BASE}/versions/2/endpoint", deployment(command=hang))
    status, body, _ = await ctl.call("POST", f"{BASE}/endpoint:switch", {"to_version": "2"})
    assert status == 409 and "pending" in body["error"]["message"]
    _, now, _ = await ctl.call("GET", f"{BASE}/endpoint")
    assert now["rule"]["destinations"] == [{"version": "1", "weight": 100}]


async def test_review_regressions_never_500(ctl: Api) -> None:
    for v in ("1", "2"):
        await ctl.call("PUT", f"{BASE}/versions/{v}/endpoint", deployment())
    for v in ("1", "2"):
        await ctl.wait_status(v, "running")
    rule = {
        "rule": {"destinations": [{"version": "1", "weight": 100}, {"version": "2", "weight": 0}]}
    }
    assert (await ctl.call("PUT", f"{BASE}/endpoint", rule))[0] == 201
    # A version the rule names with weight 0 is serving: undeploy is refused, not a 500.
    status, body, _ = await ctl.call("DELETE", f"{BASE}/versions/2/endpoint")
    assert status == 409, body
    # Odd inputs are 4xx with a JSON body.
    status, body, _ = await ctl.call("PUT", f"{BASE}/endpoint", rule, **{"If-Match": "\u00b2"})
    assert status == 400, body
    status, body, _ = await ctl.call("PUT", f"{BASE}/endpoint", "[" * 200_000)
    assert status == 400 and body["error"]["code"] == "bad_json"
    status, body, _ = await ctl.call(
        "PUT", f"{BASE}/versions/1/endpoint",
        '{"type": "custom", "command": ["x"], "autoscaling_policy": {"target_value": Infinity}}',
    )  # fmt: skip
    assert status == 400, body


async def test_a_serving_version_that_fails_is_recorded_failed(ctl: Api) -> None:
    await ctl.call("PUT", f"{BASE}/versions/1/endpoint", deployment())
    await ctl.wait_status("1", "running")
    await ctl.call(
        "PUT", f"{BASE}/endpoint", {"rule": {"destinations": [{"version": "1", "weight": 100}]}}
    )
    crash = [sys.executable, "-c", "import sys; print('bad weights'); sys.exit(4)"]
    broken = deployment(command=crash, ready_deadline_seconds=1)
    status, body, _ = await ctl.call("PUT", f"{BASE}/versions/1/endpoint", broken)
    assert status == 202, body
    # The old replica keeps serving while the new generation tries; then it fails, says why.
    body = await ctl.wait_status("1", "failed")
    assert "exit code 4" in body["message"]
    status, routes, _ = await ctl.call("GET", "/v1/routes")
    assert (
        status == 200 and routes["model_endpoints"][0]["rule"]["destinations"][0]["version"] == "1"
    )


def test_a_key_given_twice_is_refused_in_every_body(tmp_path: Path) -> None:
    """Duplicate keys were accepted, the last one winning: a reviewer, a proxy or a log
    reading the first saw another body than the controller acted on."""
    ctl = ControllerProcess(tmp_path, "--runtime", "none")
    path = "/v1/projects/fraud/models/scorer"
    try:
        cases = [
            ("PUT", f"{path}/versions/1/endpoint",
             b'{"type": "custom", "command": ["true"], "command": ["/bin/sh", "-c", "id"]}',
             ["command"]),
            ("PUT", f"{path}/endpoint",
             b'{"rule": {"destinations": [{"version": "1", "weight": 100, "weight": 0}]}}',
             ["rule.destinations.0.weight"]),
            ("POST", f"{path}/endpoint:switch", b'{"to_version": "1", "to_version": "2"}',
             ["to_version"]),
            ("POST", f"{path}/endpoint:rollback", b'{"to_revision": 1, "to_revision": 2}',
             ["to_revision"]),
            ("POST", "/v1/activations",
             b'{"project": "fraud", "model": "scorer", "version": "1", "waiting": 1, '
             b'"waiting": 1, "model": "x", "model": "y"}', ["waiting", "model"]),
        ]  # fmt: skip
        for method, where, body, paths in cases:
            status, answer = ctl.call(method, where, None, body)
            assert status == 422, (where, answer)
            assert answer["error"]["code"] == "invalid"
            assert [f["path"] for f in answer["error"]["fields"]] == paths, answer
            assert {f["message"] for f in answer["error"]["fields"]} == {
                "given more than once in one object"
            }
        # Nothing was deployed; one key in each of two objects is no repetition.
        assert ctl.call("GET", f"{path}/versions/1/endpoint")[0] == 404
        rule = (b'{"rule": {"destinations": [{"version": "1", "weight": 50}, '
                b'{"version": "2", "weight": 50}]}}')  # fmt: skip
        status, answer = ctl.call("PUT", f"{path}/endpoint", None, rule)
        assert status == 409 and answer["error"]["code"] == "conflict", answer
    finally:
        ctl.stop()
