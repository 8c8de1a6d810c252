"""Kubernetes mode against the kmock API stand-in (tests/kube.py), over real HTTP.

The informer with the real ``kubernetes.aio`` client; then ``merlin-dp controller
--kubernetes`` and ``merlin-dp gateway --controller`` as real processes, replicas as
real HTTP servers, and the cluster changed over HTTP as kubectl would.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml

from merlin_dp.common.net import free_port
from merlin_dp.controller.kubernetes.client import api_client
from merlin_dp.controller.kubernetes.informer import Informer
from tests.conftest import ROOT, Proc, Replica
from tests.kube import (
    DEPLOYMENTS,
    LEASES,
    MODEL_ENDPOINTS,
    NS,
    SLICES,
    Cluster,
    controller_calls,
    rbac_allows,
    weights,
)

Check = Callable[[], Awaitable[bool]]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = await Cluster().start()
    yield c
    await c.stop()


async def eventually(check: Check, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


# --- the informer ---------------------------------------------------------------------


async def test_informer_lists_watches_and_relists_on_410(cluster: Cluster) -> None:
    await cluster.add_slice("a", "demo", "iris", "1", [("10.0.0.1", 8080, True)])
    unlabelled = {"metadata": {"name": "unlabelled", "namespace": NS}, "endpoints": []}
    await cluster._call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
                        unlabelled)  # fmt: skip
    api = await api_client(cluster.url)
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    from kubernetes.aio.client import DiscoveryV1Api

    discovery = DiscoveryV1Api(api)

    async def list_call(watch: bool, version: str | None) -> aiohttp.ClientResponse:
        call = discovery.list_namespaced_endpoint_slice_without_preload_content
        resp: aiohttp.ClientResponse = await call(
            NS, label_selector="merlin-dp.caraml.dev/project", watch=watch,
            resource_version=version,
        )  # fmt: skip
        return resp

    project = {"merlin-dp.caraml.dev/project": None}
    informer = Informer("slices", list_call, changed, selector=project,
                        backoff_initial=0.05)  # fmt: skip
    task = asyncio.ensure_future(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        # kmock ignores the label selector: the informer filters by itself.
        assert set(informer.objects) == {"a"}
        await eventually(lambda: _true(len(cluster.k[SLICES]) >= 2), "the watch opened")
        settled = changes
        # kmock replays every object as ADDED on every watch: no change, no callback.
        await cluster.add_slice("b", "demo", "iris", "2", [("10.0.0.2", 8080, True)])
        await eventually(lambda: _true("b" in informer.objects), "b seen")
        assert changes == settled + 1
        # 410 Gone in the middle of a watch: relist, and the stale watch's event is dropped.
        # (The open watch is cut by a restart of the server; the next one expires.)
        relists = informer.relists
        cluster.expire_next_watch(SLICES)
        await cluster.go_away()
        await cluster.serve()
        await eventually(lambda: _true(informer.relists >= relists + 2), "relisted after 410")
        assert set(informer.objects) == {"a", "b"}  # no "from-a-stale-watch"
        # A label removed: the object leaves the collection.
        await cluster.patch_slice("b", {"metadata": {"labels": {
            "merlin-dp.caraml.dev/project": None}}})  # fmt: skip
        await eventually(lambda: _true(set(informer.objects) == {"a"}), "b unlabelled")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()  # type: ignore[no-untyped-call]


async def _true(value: bool) -> bool:
    return value


async def test_informer_keeps_its_cache_while_the_api_is_away(cluster: Cluster) -> None:
    await cluster.add_slice("a", "demo", "iris", "1", [("10.0.0.1", 8080, True)])
    await cluster.add_slice("b", "demo", "iris", "1", [("10.0.0.2", 8080, True)])
    api = await api_client(cluster.url)
    from kubernetes.aio.client import DiscoveryV1Api

    discovery = DiscoveryV1Api(api)

    async def list_call(watch: bool, version: str | None) -> aiohttp.ClientResponse:
        call = discovery.list_namespaced_endpoint_slice_without_preload_content
        resp: aiohttp.ClientResponse = await call(NS, watch=watch, resource_version=version)
        return resp

    informer = Informer("slices", list_call, lambda: None, backoff_initial=0.05, backoff_max=0.2)
    task = asyncio.ensure_future(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        await cluster.go_away()
        errors = informer.errors
        # While away, b is deleted (through the side door): nobody tells the informer.
        await cluster.delete(SLICES, "b")
        await eventually(lambda: _true(informer.errors > errors + 1), "failed while away")
        assert set(informer.objects) == {"a", "b"}  # the last good picture
        await cluster.serve()
        await eventually(lambda: _true(set(informer.objects) == {"a"}), "relisted when back")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()  # type: ignore[no-untyped-call]


# --- the controller and a gateway, as processes -----------------------------------------


class Stack:
    """Controller(s) in Kubernetes mode, one gateway following the first, replicas."""

    def __init__(self, tmp: Path, cluster: Cluster) -> None:
        self.tmp = tmp
        self.cluster = cluster
        self.procs: list[Proc] = []
        self.replicas: list[Replica] = []
        self.session = aiohttp.ClientSession()
        self.gateway_port = 0
        self.gateway_admin = 0

    def controller(self, identity: str, *extra: str) -> int:
        port = free_port()
        args = [sys.executable, "-m", "merlin_dp", "controller", "--kubernetes",
                "--kube-api", self.cluster.url, "--namespace", NS,
                "--listen", f"127.0.0.1:{port}", "--state-dir", str(self.tmp / identity),
                "--identity", identity, "--lease-seconds", "2", "--resync-seconds", "30",
                *extra]  # fmt: skip
        self.procs.append(Proc(args, port, self.tmp / f"controller-{identity}.log"))
        return port

    def gateway(self, controller_port: int, admin: int = 0) -> None:
        self.gateway_port, self.gateway_admin = free_port(), admin or free_port()
        args = [sys.executable, "-m", "merlin_dp", "gateway",
                "--controller", f"http://127.0.0.1:{controller_port}",
                "--listen", f"127.0.0.1:{self.gateway_port}",
                "--admin", f"127.0.0.1:{self.gateway_admin}"]  # fmt: skip
        self.procs.append(Proc(args, self.gateway_port, self.tmp / "gateway.log"))

    async def replica(self, name: str) -> Replica:
        r = await Replica(name).start()
        self.replicas.append(r)
        return r

    async def get(self, url: str) -> tuple[int, Any]:
        try:
            async with self.session.get(url) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            return 0, None

    async def ready(self, port: int) -> bool:
        status, _ = await self.get(f"http://127.0.0.1:{port}/readyz")
        return status == 200

    async def predict(self, host: str = "iris.demo.localhost") -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.gateway_port}/v1/predict"
        try:
            async with self.session.post(url, json={}, headers={"Host": host}) as resp:
                body = await resp.json(content_type=None)
                return resp.status, body.get("served_by", "") if resp.status == 200 else ""
        except aiohttp.ClientError:
            return 0, ""

    async def served(self, n: int = 40) -> Counter[str]:
        results = await asyncio.gather(*(self.predict() for _ in range(n)))
        return Counter(who if status == 200 else str(status) for status, who in results)

    async def api(self, port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{port}/v1/projects/demo/models/iris{path}"
        async with self.session.request(method, url, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    async def close(self) -> None:
        await self.session.close()
        for p in self.procs:
            await asyncio.get_running_loop().run_in_executor(None, p.stop)
        for r in self.replicas:
            await r.stop()


@pytest.fixture
async def stack(tmp_path: Path, cluster: Cluster) -> AsyncIterator[Stack]:
    s = Stack(tmp_path, cluster)
    yield s
    await s.close()
    # Least privilege, checked from the other side: whatever the controller called is
    # granted by deploy/10-rbac.yaml (tests/test_manifests.py: nothing more is granted).
    rbac = [d for d in yaml.safe_load_all((ROOT / "deploy" / "10-rbac.yaml").read_text())
            if d["kind"] in ("Role", "ClusterRole")]  # fmt: skip
    calls = controller_calls(cluster)
    assert calls, "the controller made no calls?"
    denied = sorted(c for c in calls if not rbac_allows(rbac, c))
    assert not denied, f"calls RBAC would refuse: {denied}"


def status_of(cluster: Cluster, name: str) -> dict[str, Any]:
    obj = cluster.get(MODEL_ENDPOINTS, name) or {}
    return dict(obj.get("status") or {})


def ready_condition(cluster: Cluster, name: str) -> dict[str, Any]:
    for c in status_of(cluster, name).get("conditions") or []:
        if c["type"] == "Ready":
            return dict(c)
    return {}


async def test_model_endpoints_and_slices_drive_the_gateway(stack: Stack, cluster: Cluster) -> None:
    a1, a2, b = await stack.replica("v1-a"), await stack.replica("v1-b"), await stack.replica("v2")
    await cluster.add_slice("iris-1-a", "demo", "iris", "1", [("127.0.0.1", a1.port, True)])
    await cluster.add_slice("iris-1-b", "demo", "iris", "1", [("127.0.0.1", a2.port, True)])
    await cluster.add_slice("iris-2-a", "demo", "iris", "2", [("127.0.0.1", b.port, True)])
    await cluster.apply_endpoint("demo-iris", "demo", "iris", weights(v1=100))
    port = stack.controller("solo")
    stack.gateway(port)
    await eventually(lambda: stack.ready(port), "controller ready")

    async def served_only(*names: str) -> bool:
        return set(await stack.served()) == set(names)

    # Create: the gateway serves the ModelEndpoint's rule, over both v1 replicas.
    await eventually(lambda: served_only("v1-a", "v1-b"), "v1 served by both replicas")
    cond = ready_condition(cluster, "demo-iris")
    assert (cond["status"], cond["reason"], cond["observedGeneration"]) == ("True", "Routed", 1)
    first_revision = status_of(cluster, "demo-iris")["routeRevision"]

    # An endpoint going unready leaves the table; back to ready, it returns.
    await cluster.patch_slice("iris-1-b", {"endpoints": [
        {"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]})  # fmt: skip
    await eventually(lambda: served_only("v1-a"), "only the ready v1 replica")
    await cluster.patch_slice("iris-1-b", {"endpoints": [
        {"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})  # fmt: skip
    await eventually(lambda: served_only("v1-a", "v1-b"), "both v1 replicas again")

    # Change weights with kubectl: all traffic moves to v2; status follows the generation.
    await cluster.patch_endpoint("demo-iris", {"metadata": {"generation": 2},
                                               "spec": {"rule": weights(v2=100)}})  # fmt: skip
    await eventually(lambda: served_only("v2"), "v2 takes all traffic")
    await eventually(lambda: _true(ready_condition(cluster, "demo-iris").get(
        "observedGeneration") == 2), "status observed generation 2")  # fmt: skip
    assert status_of(cluster, "demo-iris")["routeRevision"] > first_revision

    # A bad edit is refused on the object, and the last good rule keeps serving.
    await cluster.patch_endpoint("demo-iris", {"spec": {"rule": weights(v1=50)}})
    await eventually(lambda: _true(ready_condition(cluster, "demo-iris").get("reason") ==
                                   "InvalidRule"), "refusal reported")  # fmt: skip
    cond = ready_condition(cluster, "demo-iris")
    assert cond["status"] == "False"
    assert "weights must sum to 100, got 50; still serving the previous rule" in cond["message"]
    assert set(await stack.served()) == {"v2"}

    # The REST API's write becomes a patch of the same object: one state.
    code, body = await stack.api(port, "PUT", "/endpoint",
                                 {"rule": weights(v1=50, v2=50)})  # fmt: skip
    assert code == 200, body
    spec = (cluster.get(MODEL_ENDPOINTS, "demo-iris") or {})["spec"]
    assert spec["rule"]["destinations"] == weights(v1=50, v2=50)["destinations"]
    assert spec["rule"].get("mirror") is None
    await eventually(lambda: served_only("v1-a", "v1-b", "v2"), "50/50 served")
    await eventually(lambda: _true(ready_condition(cluster, "demo-iris").get("status") == "True"),
                     "Ready again")  # fmt: skip
    code, body = await stack.api(port, "GET", "/endpoint")
    assert code == 200 and body["revision"] == status_of(cluster, "demo-iris")["routeRevision"]
    # Versions are Deployments here: the API says so instead of pretending.
    code, body = await stack.api(port, "PUT", "/versions/3/endpoint",
                                 {"type": "custom", "command": ["x"]})  # fmt: skip
    assert code == 409 and body["error"]["code"] == "managed_by_kubernetes"
    code, body = await stack.api(port, "GET", "/versions/1/endpoint")
    assert code == 200 and body["spec"]["type"] == "kubernetes" and body["status"] == "serving"

    # Delete: the model's URL is gone from the gateway.
    await cluster.delete(MODEL_ENDPOINTS, "demo-iris")
    await eventually(lambda: served_only("404"), "model endpoint gone")
    # An API-created endpoint is a new ModelEndpoint object.
    code, body = await stack.api(port, "PUT", "/endpoint", {"rule": weights(v2=100)})
    assert code == 201, body
    created = cluster.get(MODEL_ENDPOINTS, "demo.iris")  # <project>.<model>
    assert created is not None and created["spec"]["project"] == "demo"
    await eventually(lambda: served_only("v2"), "API-created endpoint served")


async def test_watch_expiry_and_api_server_outage(stack: Stack, cluster: Cluster) -> None:
    r1, r2 = await stack.replica("v1"), await stack.replica("v2")
    await cluster.add_slice("iris-1-a", "demo", "iris", "1", [("127.0.0.1", r1.port, True)])
    await cluster.add_slice("iris-2-a", "demo", "iris", "2", [("127.0.0.1", r2.port, True)])
    await cluster.apply_endpoint("demo-iris", "demo", "iris", weights(v1=100))
    # The controller's first ModelEndpoint watch ends in 410 Gone: it must relist.
    cluster.expire_next_watch(MODEL_ENDPOINTS)
    port = stack.controller("solo", "--no-leader-election")
    stack.gateway(port)
    await eventually(lambda: stack.ready(port), "controller ready")
    await eventually(lambda: _served(stack, {"v1"}), "v1 served")
    watches = cluster.k[MODEL_ENDPOINTS][kmock.action.WATCH]
    await eventually(lambda: _true(len(watches) >= 2), "watched again after the 410")
    await cluster.patch_endpoint("demo-iris", {"spec": {"rule": weights(v2=100)}})
    await eventually(lambda: _served(stack, {"v2"}), "a change after the 410 is seen")

    # The API server goes away: gateways keep serving the last good table.
    await cluster.go_away()
    await asyncio.sleep(1.0)
    assert await _served(stack, {"v2"})
    code, body = await stack.api(port, "PUT", "/endpoint", {"rule": weights(v1=100)})
    assert code == 503 and body["error"]["code"] == "kubernetes_unavailable", body
    assert (cluster.get(MODEL_ENDPOINTS, "demo-iris") or {})["spec"]["rule"] == weights(v2=100)
    assert await _served(stack, {"v2"})  # nothing half-applied
    # While it is away, someone changes the rule; when it is back, it wins.
    await cluster.patch_endpoint("demo-iris", {"spec": {"rule": weights(v1=100)}})
    await cluster.serve()
    await eventually(lambda: _served(stack, {"v1"}), "the change made during the outage")


async def _served(stack: Stack, names: set[str]) -> bool:
    return set(await stack.served(20)) == names


async def test_two_controllers_one_lease(stack: Stack, cluster: Cluster) -> None:
    r1, r2 = await stack.replica("v1"), await stack.replica("v2")
    await cluster.add_slice("iris-1-a", "demo", "iris", "1", [("127.0.0.1", r1.port, True)])
    await cluster.add_slice("iris-2-a", "demo", "iris", "2", [("127.0.0.1", r2.port, True)])
    await cluster.apply_endpoint("demo-iris", "demo", "iris", weights(v1=100))
    ports = {"alpha": stack.controller("alpha"), "beta": stack.controller("beta")}

    async def one_leader() -> bool:
        answers = [await stack.get(f"http://127.0.0.1:{p}/readyz") for p in ports.values()]
        reasons = sorted(str((body or {}).get("reason")) for _, body in answers)
        return reasons == ["leading", "standby: another controller holds the lease"]

    await eventually(one_leader, "exactly one controller ready")
    lease = cluster.get(LEASES, "merlin-dp-controller") or {}
    leader = lease["spec"]["holderIdentity"]
    standby = next(n for n in ports if n != leader)
    assert await stack.ready(ports[leader]) and not await stack.ready(ports[standby])
    code, body = await stack.get(f"http://127.0.0.1:{ports[standby]}/readyz")
    assert code == 503 and "standby" in body["reason"]
    for name, leading in ((leader, 1), (standby, 0)):
        async with stack.session.get(f"http://127.0.0.1:{ports[name]}/metrics") as resp:
            text = await resp.text()
        assert f"merlin_controller_kubernetes_leading {leading}\n" in text
        assert 'merlin_controller_kubernetes_relists_total{resource="modelendpoints"}' in text
    await eventually(lambda: _true(ready_condition(cluster, "demo-iris").get("status") == "True"),
                     "the leader wrote the status")  # fmt: skip

    # The leader dies without releasing: the standby takes over once the lease runs out.
    next(p for p in stack.procs if f"controller-{leader}" in p.log.name).kill()
    await eventually(lambda: stack.ready(ports[standby]), "the standby leads", timeout=20)
    lease = cluster.get(LEASES, "merlin-dp-controller") or {}
    assert lease["spec"]["holderIdentity"] == standby
    assert lease["spec"]["leaseTransitions"] == 1
    # ...and acts: a refused edit gets its status from the new leader.
    await cluster.patch_endpoint("demo-iris", {"spec": {"rule": weights(v1=10)}})
    await eventually(lambda: _true(ready_condition(cluster, "demo-iris").get("reason") ==
                                   "InvalidRule"), "the new leader reports")  # fmt: skip
    # A gateway that follows the new leader gets a revision above the old leader's.
    stack.gateway(ports[standby])
    await eventually(lambda: _served(stack, {"v1"}), "served through the new leader")


async def test_autoscaler_patches_the_scale_subresource(stack: Stack, cluster: Cluster) -> None:
    r1 = await stack.replica("v1")
    await cluster.add_deployment("iris-1", 1)
    await cluster.add_slice("iris-1-a", "demo", "iris", "1", [("127.0.0.1", r1.port, True)],
                            labels={"merlin-dp.caraml.dev/min-replicas": "0",
                                    "merlin-dp.caraml.dev/max-replicas": "3"})  # fmt: skip
    await cluster.apply_endpoint("demo-iris", "demo", "iris", weights(v1=100))
    gw_admin = free_port()
    # The autoscaler finds gateways through the headless admin Service's EndpointSlices.
    await cluster.add_gateway_admin(gw_admin)
    port = stack.controller("solo", "--gateway-admin-service", "merlin-dp-gateway-admin",
                            "--stable-window", "2", "--scale-down-delay", "1",
                            "--scale-to-zero-grace", "1")  # fmt: skip
    stack.gateway(port, admin=gw_admin)
    await eventually(lambda: _served(stack, {"v1"}), "v1 served")

    def replicas() -> int:
        return int(((cluster.get(DEPLOYMENTS, "iris-1") or {}).get("spec") or {})["replicas"])

    # Idle past the grace: the autoscaler scales the Deployment to zero through /scale.
    await eventually(lambda: _true(replicas() == 0), "scaled to zero", timeout=30)
    scale_patches = [r for r in cluster.k[DEPLOYMENTS] if r.method == "PATCH"]
    assert scale_patches and all(str(r.url).endswith("/deployments/iris-1/scale")
                                 for r in scale_patches)  # fmt: skip
    # The pods leave the slice; a request arriving now is held and activates the version.
    await cluster.patch_slice("iris-1-a", {"endpoints": []})

    async def gateway_at_zero() -> bool:
        _, table = await stack.get(f"http://127.0.0.1:{port}/v1/routes")
        if table is None or table["version_endpoints"][0]["replicas"]:
            return False
        _, ready = await stack.get(f"http://127.0.0.1:{gw_admin}/readyz")
        return bool(ready) and ready["workers"][0]["revision"] >= table["revision"]

    await eventually(gateway_at_zero, "the gateway knows v1 has no replica")
    held = asyncio.ensure_future(stack.predict())
    await eventually(lambda: _true(replicas() == 1), "activated: scaled to one", timeout=20)
    await cluster.patch_slice("iris-1-a", {"endpoints": [
        {"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})  # fmt: skip
    status, who = await asyncio.wait_for(held, 30)
    assert (status, who) == (200, "v1")


async def test_a_rollout_declared_in_the_model_endpoint(stack: Stack, cluster: Cluster) -> None:
    """spec.rollout starts it; each move is a patch of spec.rule; status.rollout shows
    the progress, and the API reads the same rollout."""
    r1, r2 = await stack.replica("v1"), await stack.replica("v2")
    await cluster.add_slice("iris-1-a", "demo", "iris", "1", [("127.0.0.1", r1.port, True)])
    await cluster.add_slice("iris-2-a", "demo", "iris", "2", [("127.0.0.1", r2.port, True)])
    gw_admin = free_port()
    await cluster.add_gateway_admin(gw_admin)
    # The test replicas answer with their own names: predictions are not compared.
    plan = {"candidate": "2", "steps": [50], "step_seconds": 1,
            "analysis": {"min_samples": 20, "settle_seconds": 0, "error_rate_margin": 0.1,
                         "latency_slowdown": 5, "compare_predictions": False}}  # fmt: skip
    await cluster.apply_endpoint("demo-iris", "demo", "iris", weights(v1=100), rollout=plan)
    port = stack.controller("solo", "--gateway-admin-service", "merlin-dp-gateway-admin")
    stack.gateway(port, admin=gw_admin)
    await eventually(lambda: _served(stack, {"v1"}), "v1 served")

    async def promoted() -> bool:
        await stack.served(10)
        rollout = status_of(cluster, "demo-iris").get("rollout") or {}
        return rollout.get("phase") == "promoted"

    await eventually(promoted, "the rollout promoted v2", timeout=60)
    obj = cluster.get(MODEL_ENDPOINTS, "demo-iris") or {}
    assert obj["spec"]["rule"]["destinations"] == weights(v2=100)["destinations"]
    assert obj["spec"]["rollout"]["candidate"] == "2"  # the plan stays as applied
    rollout = status_of(cluster, "demo-iris")["rollout"]
    assert [d["action"] for d in rollout["decisions"]] == ["start", "step", "promote"]
    assert status_of(cluster, "demo-iris").get("rolloutError") is None
    code, body = await stack.api(port, "GET", "/endpoint/rollout")
    assert code == 200 and body["phase"] == "promoted"
    await eventually(lambda: _served(stack, {"v2"}), "v2 takes all traffic")
    # A plan that can't start says why on the object, and routing is untouched.
    await cluster.patch_endpoint("demo-iris", {"spec": {"rollout": {"candidate": "7"}}})
    await eventually(lambda: _true(bool(status_of(cluster, "demo-iris").get("rolloutError"))),
                     "the refusal reported")  # fmt: skip
    assert "7" in status_of(cluster, "demo-iris")["rolloutError"]
    assert set(await stack.served()) == {"v2"}
