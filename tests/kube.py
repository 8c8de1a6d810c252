"""The Kubernetes API stand-in for tests: kmock's emulator on a real port, and what it lacks.

kmock (pinned in pyproject) keeps objects in memory and serves list, watch, get, create,
merge-patch and delete over real HTTP; the controller talks to it with the real
``kubernetes.aio`` client. Its gaps, and what this module does about each:

- it replays every object as ADDED on every watch, and ignores label selectors and
  resourceVersion: nothing to add; the informer must cope (the tests check it does);
- it answers create with 200 where the client's generated code wants 201 (the created
  object comes back as None): the controller must not depend on that body;
- it renders no ``Scale`` for ``deployments/<name>/scale``: :meth:`Cluster.start`
  installs a reaction that renders one from the Deployment (a merge patch of the scale
  subresource lands on the Deployment itself, which is the behaviour wanted);
- it never sends 410 Gone: :meth:`Cluster.expire_next_watch` injects one, mid-stream;
- it sets no ``metadata.generation``: tests that check ``observedGeneration`` set it.

The emulator is served by a plain aiohttp server of our own rather than ``kmock.Server``,
which also patches aiohttp's DNS resolution in the test process (not wanted here: nothing
in a test may monkeypatch the network).

Test-side changes go over HTTP too (as kubectl would), so they reach open watches. They
use a second port onto the same emulator (the "side door"), so a test can change the
cluster while the API server the controller talks to is away (:meth:`Cluster.go_away`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import kmock
from aiohttp import web

from merlin_dp.controller.kubernetes.objects import (
    GROUP,
    KIND,
    MODEL_LABEL,
    PLURAL,
    PROJECT_LABEL,
    SERVICE_NAME_LABEL,
    VERSION,
    VERSION_LABEL,
)

NS = "merlin-dp"
MODEL_ENDPOINTS = kmock.resource(f"{GROUP}/{VERSION}/{PLURAL}")
SLICES = kmock.resource("discovery.k8s.io/v1/endpointslices")
LEASES = kmock.resource("coordination.k8s.io/v1/leases")
DEPLOYMENTS = kmock.resource("apps/v1/deployments")

PATHS = {
    MODEL_ENDPOINTS: f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}",
    SLICES: f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
    LEASES: f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases",
    DEPLOYMENTS: f"/apis/apps/v1/namespaces/{NS}/deployments",
}


class Cluster:
    def __init__(self) -> None:
        self.k = kmock.KubernetesEmulator()
        self.server: web.ServerRunner | None = None
        self.side: web.ServerRunner | None = None
        self.port = 0
        self.session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Cluster:
        await self.k.__aenter__()
        res = self.k.resources
        res[MODEL_ENDPOINTS] = kmock.ResourceInfo(kind=KIND, namespaced=True,
                                                  subresources={"status"})  # fmt: skip
        res[SLICES] = kmock.ResourceInfo(kind="EndpointSlice", namespaced=True)
        res[LEASES] = kmock.ResourceInfo(kind="Lease", namespaced=True)
        res[DEPLOYMENTS] = kmock.ResourceInfo(kind="Deployment", namespaced=True,
                                              subresources={"scale"})  # fmt: skip
        self.k[DEPLOYMENTS, kmock.subresource("scale")] << self._render_scale
        self.server, self.port = await self._listen(0)
        self.side, side_port = await self._listen(0)
        self.session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{side_port}")
        return self

    async def _listen(self, port: int) -> tuple[web.ServerRunner, int]:
        runner = web.ServerRunner(web.Server(self.k), shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        return runner, runner.addresses[0][1]

    async def serve(self) -> None:
        """Start answering again, on the same port, after :meth:`go_away`."""
        assert self.server is None
        self.server, _ = await self._listen(self.port)

    async def go_away(self) -> None:
        """The API server stops: listening socket and open watches closed."""
        assert self.server is not None
        await self.server.cleanup()
        self.server = None

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.server is not None:
            await self.go_away()
        if self.side is not None:
            await self.side.cleanup()
        await self.k.__aexit__(None, None, None)

    # --- what tests do to the cluster, over HTTP ----------------------------------------

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        assert self.session is not None
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, path, json=body, headers=headers) as resp:
            text = await resp.text()
            assert resp.status < 300, f"{method} {path}: {resp.status} {text}"
            return json.loads(text) if text else None

    async def apply_endpoint(
        self, name: str, project: str, model: str, rule: dict[str, Any], **spec: Any
    ) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": NS, "generation": 1},
            "spec": {"project": project, "model": model, "rule": rule, **spec},
        }
        await self._call("POST", PATHS[MODEL_ENDPOINTS], body)

    async def add_gateway_admin(self, port: int) -> None:
        """The headless admin Service's slice, through which the controller finds
        gateways (--gateway-admin-service merlin-dp-gateway-admin)."""
        await self._call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", {
            "metadata": {"name": "merlin-dp-gateway-admin-x", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "merlin-dp-gateway-admin"}},
            "ports": [{"name": "admin", "port": port}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        })  # fmt: skip

    async def patch_endpoint(self, name: str, patch: dict[str, Any]) -> None:
        await self._call("PATCH", f"{PATHS[MODEL_ENDPOINTS]}/{name}", patch)

    async def delete(self, resource: kmock.resource, name: str) -> None:
        await self._call("DELETE", f"{PATHS[resource]}/{name}")

    async def add_slice(
        self,
        name: str,
        project: str,
        model: str,
        version: str,
        endpoints: list[tuple[str, int, bool]],  # (ip, port, ready)
        *,
        service: str = "",
        port_name: str = "http",
        labels: dict[str, str] | None = None,
    ) -> None:
        body = slice_object(name, project, model, version, endpoints, service=service,
                            port_name=port_name, labels=labels)  # fmt: skip
        await self._call("POST", PATHS[SLICES], body)

    async def patch_slice(self, name: str, patch: dict[str, Any]) -> None:
        await self._call("PATCH", f"{PATHS[SLICES]}/{name}", patch)

    async def add_deployment(self, name: str, replicas: int) -> None:
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas},
        }
        await self._call("POST", PATHS[DEPLOYMENTS], body)

    def get(self, resource: kmock.resource, name: str) -> dict[str, Any] | None:
        key = (resource, NS, name)
        if key not in self.k.objects or self.k.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.k.objects[key].raw
        return raw

    def expire_next_watch(self, resource: kmock.resource) -> None:
        """The next watch of ``resource`` streams one event, then a 410 Gone in the stream."""
        seen = max((r.id for r in self.k), default=-1)
        chosen: list[int] = []

        def once(request: kmock.Request) -> bool:
            # kmock asks a criterion about every request it has recorded, old ones too, and
            # about the same one more than once: pick the first watch from now on, by id.
            if request.id <= seen:
                return False
            if not chosen and request.action == kmock.action.WATCH and request.resource == resource:
                chosen.append(request.id)
            return request.id in chosen

        gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "code": 410,
                                            "reason": "Expired", "message": "too old"}}  # fmt: skip
        bogus = {"type": "ADDED", "object": {"metadata": {"name": "from-a-stale-watch"}}}
        self.k[kmock.action.WATCH, resource, once] << (bogus, lambda: asyncio.sleep(0.2), gone)

    def _render_scale(self, request: kmock.Request) -> dict[str, Any]:
        # kmock applied a PATCH to the Deployment object already; answer as the API does.
        deployment = self.get(DEPLOYMENTS, str(request.name)) or {}
        replicas = (deployment.get("spec") or {}).get("replicas", 0)
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": request.name, "namespace": NS},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas},
        }


VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create",
         "DELETE": "delete"}  # fmt: skip


def controller_calls(cluster: Cluster) -> set[tuple[str, str, str, str]]:
    """(API group, resource[/subresource], verb, object name) of every request the
    controller's client made (not the test's own, which carry aiohttp's User-Agent)."""
    calls = set()
    for r in cluster.k:
        if r.resource is None or not str(r.headers.get("User-Agent", "")).startswith("OpenAPI"):
            continue
        action = r.action.name if r.action is not None else ""
        verb = VERBS.get(action) or ("patch" if r.method.name == "PATCH" else "update")
        resource = str(r.resource.plural) + (f"/{r.subresource}" if r.subresource else "")
        calls.add((str(r.resource.group), str(resource), verb, str(r.name or "")))
    return calls


def rbac_allows(rbac: list[dict[str, Any]], call: tuple[str, str, str, str]) -> bool:
    group, resource, verb, name = call
    for role in rbac:
        for rule in role.get("rules") or []:
            names = rule.get("resourceNames")
            if (group in rule["apiGroups"] and resource in rule["resources"]
                    and verb in rule["verbs"] and (not names or name in names)):  # fmt: skip
                return True
    return False


def slice_object(
    name: str,
    project: str,
    model: str,
    version: str,
    endpoints: list[tuple[str, int, bool]],
    *,
    service: str = "",
    port_name: str = "http",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    ports = sorted({port for _, port, _ in endpoints}) or [8080]
    assert len(ports) == 1, "one port per slice (as in a Service's slices)"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                PROJECT_LABEL: project,
                MODEL_LABEL: model,
                VERSION_LABEL: version,
                SERVICE_NAME_LABEL: service or f"{model}-{version}",
                **(labels or {}),
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": ports[0], "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": f"{name}-{i}"},
            }
            for i, (ip, _, ready) in enumerate(endpoints)
        ],
    }


def me(name: str, project: str, model: str, rule: dict[str, Any], created: str = "t1",
       **spec: Any) -> dict[str, Any]:  # fmt: skip
    """A ModelEndpoint object as an informer holds it (for derive() tests)."""
    return {
        "metadata": {"name": name, "creationTimestamp": created, "generation": 3},
        "spec": {"project": project, "model": model, "rule": rule, **spec},
    }


def weights(**w: int) -> dict[str, Any]:
    """``weights(v1=90, v2=10)`` → a rule's destinations."""
    return {"destinations": [{"version": v.lstrip("v"), "weight": n} for v, n in w.items()]}
