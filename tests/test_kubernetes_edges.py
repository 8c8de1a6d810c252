"""Kubernetes mode's edge cases (merlin_dp/controller/kubernetes/), from a review of it: each was a
bug found by a failing test here, except those marked "COVERAGE", which cover a path
nothing else tested. Pure derive()/status tests first; then kmock over real HTTP
(tests/kube.py), with a slow front or a held list where an interleaving matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from merlin_dp.controller.kubernetes.client import api_client
from merlin_dp.controller.kubernetes.cluster import (
    Condition,
    derive,
    status_patch,
    versions_from_slices,
)
from merlin_dp.controller.kubernetes.lease import LeaderElector
from merlin_dp.controller.kubernetes.objects import LEASE_NAME
from merlin_dp.controller.kubernetes.sync import KubernetesSync, gateway_urls
from merlin_dp.controller.models import ControllerState, ModelEndpointBody
from merlin_dp.controller.service import Controller
from merlin_dp.controller.state import ApiError, set_endpoint
from merlin_dp.controller.store import FileStore
from merlin_dp.spec.rule import Rule
from tests.kube import LEASES, MODEL_ENDPOINTS, NS, Cluster, me, slice_object, weights

NOW = 1_000.0


SLICES = [
    slice_object("iris-1-a", "demo", "iris", "1", [("10.0.0.1", 8080, True)]),
    slice_object("iris-2-a", "demo", "iris", "2", [("10.0.0.2", 8080, True)]),
]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies ``application/merge-patch+json``."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


# --- derive() ----------------------------------------------------------------------------


def test_an_invalid_older_endpoint_does_not_steal_a_routed_model() -> None:
    """A ModelEndpoint that never routed (invalid spec from the start) must not take the
    project/model away from the newer one that routes it. derive() is not idempotent
    here: the second call with the *same* inputs flips the newer one to Conflict."""
    broken = me("old-broken", "demo", "iris", weights(v1=50), created="t1")
    good = me("new-good", "demo", "iris", weights(v1=100), created="t2")
    endpoints = {"old-broken": broken, "new-good": good}
    first = derive(ControllerState(), endpoints, SLICES, now=NOW)
    assert first.conditions["new-good"].reason == "Routed"
    second = derive(first.state, endpoints, SLICES, now=NOW)
    # Nothing changed in the cluster: nothing may change in the verdicts.
    assert second.conditions["new-good"].reason == "Routed", second.conditions["new-good"]
    assert second.conditions["old-broken"].reason == "InvalidRule"
    assert "still serving" not in second.conditions["old-broken"].message


def test_a_refused_protocol_edit_keeps_the_last_good_rule() -> None:
    """docs/kubernetes.md: a refused edit of a routed ModelEndpoint does not take the
    model down. An edit of ``protocol`` that the versions refuse (ProtocolMismatch)
    drops the model from the table instead (InvalidRule edits do keep it)."""
    routed = me("iris", "demo", "iris", weights(v1=100))
    first = derive(ControllerState(), {"iris": routed}, SLICES, now=NOW)
    assert "demo/iris" in first.state.endpoints
    edited = me("iris", "demo", "iris", weights(v1=100), protocol="UPI_V1")
    second = derive(first.state, {"iris": edited}, SLICES, now=NOW)
    assert second.conditions["iris"].reason == "ProtocolMismatch"
    assert "demo/iris" in second.state.endpoints, "the model went down on a refused edit"
    assert "still serving the previous rule" in second.conditions["iris"].message


def test_status_that_loses_its_route_revision_converges() -> None:
    """status_patch() omits ``routeRevision`` when nothing is routed any more; as a merge
    patch that leaves the old value on the object, so _same_status never agrees again and
    the leader rewrites the status on every reconcile (a write storm; and a stale
    routeRevision is shown)."""
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    obj = me("iris", "demo", "iris", weights(v1=100))
    routed = status_patch(obj, Condition("True", "Routed", "in"), 7, now)
    assert routed is not None
    obj["status"] = merge_patch({}, routed)
    refused = Condition("False", "Conflict", "ModelEndpoint other already routes demo/iris")
    first = status_patch(obj, refused, None, now)
    assert first is not None
    obj["status"] = merge_patch(obj["status"], first)  # what the API server stores
    assert "routeRevision" not in obj["status"], "a stale routeRevision stays on the object"
    assert status_patch(obj, refused, None, now) is None, "written again on every reconcile"


def test_an_endpoint_in_two_slices_does_not_depend_on_slice_order() -> None:
    """The API allows one endpoint in two slices of a Service for a while (the slice
    controller moving it): the verdict must not depend on the informer's dict order.
    Here one slice says ready, the other (stale copy) says terminating."""
    ready = slice_object("iris-1-a", "demo", "iris", "1", [("10.0.0.1", 8080, True)])
    stale = slice_object("iris-1-b", "demo", "iris", "1", [("10.0.0.1", 8080, True)])
    stale["endpoints"][0]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    one = versions_from_slices([ready, stale])["demo/iris/1"].ready
    other = versions_from_slices([stale, ready])["demo/iris/1"].ready
    assert one == other, (one, other)


def placeholder(name: str, project: str, model: str, version: str) -> dict[str, Any]:
    """What the EndpointSlice controller keeps for a Service with no pods (a Deployment at
    zero): one slice with the Service's labels, no endpoints and no ports."""
    s = slice_object(name, project, model, version, [])
    s["ports"] = []
    s["endpoints"] = []
    return s


def test_a_upi_version_at_zero_keeps_its_model_endpoint_routed() -> None:
    """Scale to zero of a UPI_V1 version: its only slice becomes the placeholder (no
    ``grpc`` port), so _version() calls it HTTP_JSON, the ModelEndpoint is refused with
    ProtocolMismatch and, as the old rule fails the same check, dropped from the table.
    Gateways then have no route to hold requests for and nothing wakes the version."""
    upi = slice_object("upi-1-a", "demo", "upi", "1", [("10.0.0.3", 9000, True)], port_name="grpc")
    endpoint = me("upi", "demo", "upi", weights(v1=100), protocol="UPI_V1")
    first = derive(ControllerState(), {"upi": endpoint}, [upi], now=NOW)
    assert first.conditions["upi"].reason == "Routed"
    at_zero = [placeholder("upi-1-a", "demo", "upi", "1")]
    second = derive(first.state, {"upi": endpoint}, at_zero, now=NOW)
    assert second.conditions["upi"].reason == "Routed", second.conditions["upi"]
    assert "demo/upi" in second.state.endpoints, "the model endpoint left the table at zero"
    assert second.state.versions["demo/upi/1"].spec.protocol == "UPI_V1"


def test_an_http_version_at_zero_reports_no_bogus_problem() -> None:
    """The same placeholder for an HTTP_JSON version: the version endpoint's message says
    "EndpointSlice ... has no port named http", which is just what zero looks like."""
    v = versions_from_slices([placeholder("iris-1-a", "demo", "iris", "1")])["demo/iris/1"]
    assert v.problems == (), v.problems


def test_dual_stack_slices_count_each_pod_once() -> None:
    """A dual-stack Service has an IPv4 and an IPv6 slice for the same pods. The
    autoscaler counts replicas from these: one pod must be one replica, not two."""
    v4 = slice_object("iris-1-v4", "demo", "iris", "1", [("10.0.0.1", 8080, True)])
    v6 = slice_object("iris-1-v6", "demo", "iris", "1", [("fd00::1", 8080, True)])
    v6["addressType"] = "IPv6"
    v6["endpoints"][0]["targetRef"]["name"] = v4["endpoints"][0]["targetRef"]["name"]
    v = versions_from_slices([v4, v6])["demo/iris/1"]
    pods = [r.pod for r in v.replicas]
    assert len(pods) == len(set(pods)), f"pod counted twice: {v.replicas}"


def test_dual_stack_gateway_slices_poll_each_gateway_once() -> None:
    """The headless admin Service of a dual-stack cluster has an IPv4 and an IPv6 slice
    for the same gateway pods: gateway_urls() lists each gateway twice, so the
    autoscaler's GatewaySignals fetches (and adds) every gateway's request signals twice
    and scales on double the traffic."""
    v4 = slice_object("gw-v4", "x", "x", "x", [("10.0.0.9", 8081, True)], port_name="admin")
    v6 = slice_object("gw-v6", "x", "x", "x", [("fd00::9", 8081, True)], port_name="admin")
    v6["addressType"] = "IPv6"
    v6["endpoints"][0]["targetRef"]["name"] = v4["endpoints"][0]["targetRef"]["name"]
    urls = gateway_urls([v4, v6])
    assert len(urls) == 1, f"one gateway pod, polled as {urls}"


def test_the_scaled_deployment_does_not_depend_on_slice_order() -> None:
    """Two Services carrying a version's three labels (e.g. the version's Service and a
    second one for its metrics): Version.service (the Deployment the autoscaler scales)
    and the autoscaling labels come from whichever slice the informer's dict yields
    first."""
    a = slice_object("iris-1-a", "demo", "iris", "1", [("10.0.0.1", 8080, True)],
                     service="iris-1")  # fmt: skip
    b = slice_object("iris-1-metrics-a", "demo", "iris", "1", [("10.0.0.1", 8080, True)],
                     service="iris-1-metrics")  # fmt: skip
    one = versions_from_slices([a, b])["demo/iris/1"].service
    other = versions_from_slices([b, a])["demo/iris/1"].service
    assert one == other, (one, other)


def test_ipv6_and_nil_ready_endpoints() -> None:
    """COVERAGE: an IPv6 slice's address is bracketed; ``ready`` null is ready;
    serving-but-terminating drains."""
    s = slice_object("a", "demo", "iris", "1", [("fd00::1", 8080, True), ("fd00::2", 8080, True)])
    s["addressType"] = "IPv6"
    s["endpoints"][0]["conditions"] = {"ready": None}
    s["endpoints"][1]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    v = versions_from_slices([s])["demo/iris/1"]
    assert v.ready == ["[fd00::1]:8080"]
    assert {r.address: r.state for r in v.replicas}["[fd00::2]:8080"] == "draining"


# --- kmock over real HTTP -------------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = await Cluster().start()
    yield c
    await c.stop()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def _sync(
    tmp: Path, cluster: Cluster, url: str = "", **kw: Any
) -> tuple[Controller, KubernetesSync]:
    controller = Controller(FileStore(tmp), None)
    await controller.start()
    api = await api_client(url or cluster.url)
    sync = KubernetesSync(controller, api, NS, identity="me", **kw)
    await sync.start()
    await eventually(lambda: sync.derived is not None, "first reconcile")
    return controller, sync


def _put(rule: dict[str, Any]) -> Callable[[ControllerState], ControllerState]:
    body = ModelEndpointBody(rule=Rule.model_validate(rule))
    return lambda s: set_endpoint(s, "demo", "iris", body, by="api", now=NOW)


async def test_release_on_shutdown_leaves_the_lease_free(cluster: Cluster, tmp_path: Path) -> None:
    """KubernetesSync.close() releases the Lease *before* it cancels the elector's loop.
    A loop iteration running meanwhile reads the released Lease (empty holder), takes it
    straight back and even calls on_started again; the process then exits holding a
    15 s Lease, so the standby waits it out. The interleaving is forced by an API server
    that is slow to answer the loop's read (a front server before kmock, real HTTP)."""
    hold, held, opened, renewed = (asyncio.Event() for _ in range(4))

    async def front(request: web.BaseRequest) -> web.StreamResponse:
        lease = request.path.endswith(f"/leases/{LEASE_NAME}")
        body = await request.read()  # cached: kmock reads it again
        if lease and request.method == "GET" and hold.is_set() and not held.is_set():
            held.set()  # the elector loop's next read waits here
            await opened.wait()
        if lease and request.method == "PATCH" and b"renewTime" in body and opened.is_set():
            response = await cluster.k(request)
            renewed.set()
            return response
        if lease and request.method == "PATCH" and b"renewTime" not in body:  # the release
            response = await cluster.k(request)
            opened.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(renewed.wait(), 3)
            return response
        return await cluster.k(request)

    runner = web.ServerRunner(web.Server(front), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    controller, sync = await _sync(tmp_path, cluster, url=url, retry_seconds=0.05)
    try:
        await eventually(lambda: sync.leading, "leading")
        hold.set()
        await asyncio.wait_for(held.wait(), 15)
        await sync.close()
        lease = cluster.get(LEASES, LEASE_NAME) or {}
        holder = (lease.get("spec") or {}).get("holderIdentity")
        assert not holder, f"the Lease still names {holder!r} after release on shutdown"
    finally:
        opened.set()
        await controller.close()
        await runner.cleanup()


async def test_api_put_edits_the_modelendpoint_that_names_the_model(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A ModelEndpoint applied with kubectl for demo/iris is refused (weights sum to 50,
    never routed). The REST API's PUT for demo/iris must fix *that* object; _owner()
    only knows ModelEndpoints with a key in derived.keys (not invalid ones), so the API
    creates a second object ``demo-iris`` (on a real server, a 409 forever if the
    kubectl one had that name) and two ModelEndpoints now claim one model."""
    for s in SLICES:
        await cluster._call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", s)
    await cluster.apply_endpoint("iris-by-kubectl", "demo", "iris", weights(v1=50))
    controller, sync = await _sync(tmp_path, cluster, leader_election=False)
    try:
        await eventually(
            lambda: "iris-by-kubectl" in (sync.derived.conditions if sync.derived else {}),
            "derived",
        )
        await controller.change(_put(weights(v1=100)), None)
        assert cluster.get(MODEL_ENDPOINTS, "demo-iris") is None, "a second ModelEndpoint"
        fixed = cluster.get(MODEL_ENDPOINTS, "iris-by-kubectl") or {}
        assert fixed["spec"]["rule"]["destinations"] == [{"version": "1", "weight": 100}]
    finally:
        await controller.close()


async def test_api_put_for_a_model_whose_default_name_is_taken(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The API creates a ModelEndpoint named ``<project>-<model>``: project ``a-b`` model
    ``c`` and project ``a`` model ``b-c`` both map to ``a-b-c``. The second model's first
    PUT then fails with 409 "changed meanwhile; read it again and retry", forever."""
    for project, model in (("a", "b-c"), ("a-b", "c")):
        s = slice_object(f"{project}.{model}.1", project, model, "1", [("10.0.0.1", 8080, True)])
        await cluster._call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", s)
    await cluster.apply_endpoint("a-b-c", "a", "b-c", weights(v1=100))
    controller, _ = await _sync(tmp_path, cluster, leader_election=False)
    try:
        await eventually(lambda: "a/b-c" in controller.state.endpoints, "a/b-c routed")
        body = ModelEndpointBody(rule=Rule.model_validate(weights(v1=100)))
        try:
            await controller.change(
                lambda s: set_endpoint(s, "a-b", "c", body, by="api", now=NOW), None
            )
        except ApiError as exc:
            pytest.fail(f"PUT a-b/c refused: {exc.status} {exc}")
        await eventually(lambda: "a-b/c" in controller.state.endpoints, "a-b/c routed")
    finally:
        await controller.close()


async def test_a_relist_racing_an_api_write_does_not_flap_the_rule(
    cluster: Cluster, tmp_path: Path
) -> None:
    """sync._put writes the server's answer into the informer's dict; a relist whose list
    was read before the write then replaces the whole dict with the older content, and
    the next reconcile publishes the *old* rule again (a new revision) until the watch
    brings the write back: gateways see new -> old -> new."""
    for s in SLICES:
        await cluster._call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", s)
    await cluster.apply_endpoint("iris", "demo", "iris", weights(v1=100))
    controller, sync = await _sync(tmp_path, cluster, leader_election=False)
    try:
        await eventually(lambda: "demo/iris" in controller.state.endpoints, "routed")
        # Hold the next list's answer (already read from the server) until the API write
        # is done, then the watch that follows it (a slow server), so the reconcile after
        # the relist sees exactly what the relist left in the cache.
        listed, release, watch_gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
        inner = sync.endpoints.list_call

        async def held(watch: bool, version: str | None) -> aiohttp.ClientResponse:
            if watch and release.is_set():
                await watch_gate.wait()
            resp = await inner(watch, version)
            if not watch and not release.is_set():
                await resp.read()
                listed.set()
                await release.wait()
            return resp

        sync.endpoints.list_call = held
        # End the current watch so the informer relists (a restart of the API server).
        await cluster.go_away()
        await cluster.serve()
        await asyncio.wait_for(listed.wait(), 15)
        await controller.change(_put(weights(v1=0, v2=100)), None)
        new_rule = Rule.model_validate(weights(v1=0, v2=100))
        assert controller.state.endpoints["demo/iris"].rule == new_rule
        release.set()
        await eventually(lambda: sync.endpoints.relists >= 2, "relisted")
        await eventually(lambda: not sync._dirty.is_set(), "reconciled")
        await asyncio.sleep(0.3)  # let the reconcile finish (not a duration assertion)
        assert controller.state.endpoints["demo/iris"].rule == new_rule, (
            "the relist put the old rule back into the table after the API write"
        )
        watch_gate.set()
    finally:
        await controller.close()


async def test_lease_standby_waits_for_expiry_then_takes_over(cluster: Cluster) -> None:
    """COVERAGE: a second elector does not lead while the first renews, and
    takes over once the first stops renewing (clock injected, no real waiting)."""
    t = [100.0]
    api = await api_client(cluster.url)
    events: list[str] = []
    a = LeaderElector(api, NS, LEASE_NAME, "a", on_started=lambda: events.append("a+"),
                      on_stopped=lambda: events.append("a-"), clock=lambda: t[0])  # fmt: skip
    b = LeaderElector(api, NS, LEASE_NAME, "b", on_started=lambda: events.append("b+"),
                      on_stopped=lambda: events.append("b-"), clock=lambda: t[0])  # fmt: skip
    try:
        assert await a._try()
        assert not await b._try()  # first sight of a's renewTime
        t[0] += 10.0
        assert await a._try()  # a renews
        assert not await b._try()  # a new renewTime: b's timer restarts
        t[0] += 14.0
        assert not await b._try()
        t[0] += 2.0  # 16 s without a renewal seen by b
        assert await b._try()
        assert not await a._try()
    finally:
        await api.close()  # type: ignore[no-untyped-call]
