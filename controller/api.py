"""The controller's HTTP API (aiohttp), its errors, auth and OpenAPI document.

Routes under ``/v1/projects/{project}/models/{model}``: version endpoints
(``versions/{version}/endpoint``), the model endpoint (``endpoint``, ``endpoint:switch``,
``endpoint:rollback``, ``endpoint/history``), plus ``/v1/routes`` (with ``watch=1`` a
newline-delimited JSON stream of whole route tables for gateways), ``/v1/audit``,
``/openapi.json``, ``/healthz``, ``POST /v1/activations`` (a gateway's poke for a version
at zero) and ``/metrics`` (the attached autoscaler's). Errors are
``{"error": {"code", "message", "fields"}}``: 400 malformed JSON, 401/403 auth, 404
unknown, 409 forbidden by the current state, 412 stale ``If-Match``, 413 body too large,
422 invalid body (with field paths), 503 store or autoscaler unavailable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from controller import state as st
from controller.auth import Access, Principal, Tokens
from controller.models import (
    ActivationBody,
    ModelEndpoint,
    ModelEndpointBody,
    RollbackBody,
    SwitchBody,
    VersionEndpoint,
    VersionEndpointSpec,
)
from controller.openapi import openapi_document
from controller.service import Controller
from controller.store import StoreError
from gateway.rule import NAME_PATTERN, VERSION_PATTERN

log = logging.getLogger("controller.api")
Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRINCIPAL = web.RequestKey("principal", Principal)
MAX_BODY = 1024 * 1024
WATCH_HEARTBEAT_SECONDS = 15.0


def error(
    status: int, code: str, message: str, fields: list[dict[str, str]] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "fields": fields or []}}
    return web.json_response(body, status=status)


def make_app(controller: Controller, tokens: Tokens) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except st.ApiError as exc:
            return error(exc.status, exc.code, exc.message, getattr(exc, "fields", None))
        except StoreError as exc:
            return error(503, "store_unavailable", f"the state store is unavailable: {exc}")
        except web.HTTPRequestEntityTooLarge:
            return error(413, "body_too_large", f"request bodies are limited to {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status >= 400:
                return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return error(500, "internal_error", "internal controller error")

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz", "/openapi.json"):
            return await handler(request)
        principal = tokens.authenticate(request.headers.get("Authorization"))
        if principal is None:
            return error(401, "unauthorized", "a valid bearer token is required")
        request[PRINCIPAL] = principal
        return await handler(request)

    api = Api(controller)
    app = web.Application(middlewares=[errors, auth], client_max_size=MAX_BODY)
    base = "/v1/projects/{project}/models/{model}"
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/openapi.json", api.openapi)
    app.router.add_get("/v1/routes", api.routes)
    app.router.add_get("/v1/audit", api.audit)
    app.router.add_post("/v1/activations", api.activate)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get(base + "/versions", api.list_versions)
    app.router.add_put(base + "/versions/{version}/endpoint", api.deploy)
    app.router.add_get(base + "/versions/{version}/endpoint", api.get_version)
    app.router.add_delete(base + "/versions/{version}/endpoint", api.undeploy)
    app.router.add_put(base + "/endpoint", api.put_endpoint)
    app.router.add_get(base + "/endpoint", api.get_endpoint)
    app.router.add_delete(base + "/endpoint", api.delete_endpoint)
    app.router.add_get(base + "/endpoint/history", api.history)
    app.router.add_post(base + "/endpoint:switch", api.switch)
    app.router.add_post(base + "/endpoint:rollback", api.rollback)
    return app


class Api:
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    # --- helpers --------------------------------------------------------------------

    def _names(self, request: web.Request, access: Access) -> tuple[str, str, str | None]:
        project = request.match_info["project"]
        model = request.match_info["model"]
        version = request.match_info.get("version")
        problems = []
        if not re.fullmatch(NAME_PATTERN, project) or len(project) > 63:
            problems.append({"path": "project", "message": "lowercase letters, digits and dashes"})
        if not re.fullmatch(NAME_PATTERN, model) or len(model) > 63:
            problems.append({"path": "model", "message": "lowercase letters, digits and dashes"})
        if version is not None and (
            not re.fullmatch(VERSION_PATTERN, version) or len(version) > 32
        ):
            problems.append({"path": "version", "message": "lowercase letters, digits and dots"})
        if problems:
            raise _Invalid(problems)
        principal = request[PRINCIPAL]
        if not principal.may(access, project):
            raise st.ApiError(
                403, "forbidden", f"{principal.name} may not {access} project {project}"
            )
        return project, model, version

    @staticmethod
    async def _body(request: web.Request, model: type[Model], allow_empty: bool = False) -> Model:
        raw = await request.read()
        if not raw.strip() and allow_empty:
            return model()
        try:
            data = json.loads(raw, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:
            raise st.ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _Invalid(
                [
                    {"path": ".".join(str(p) for p in e["loc"]) or "(body)",
                     "message": e["msg"].removeprefix("Value error, ")}
                    for e in exc.errors(include_url=False)
                ]
            ) from None  # fmt: skip

    @staticmethod
    def _if_match(request: web.Request) -> int | None:
        value = request.headers.get("If-Match")
        if value is None:
            return None
        value = value.strip().strip('"').removeprefix("W/").strip('"')
        if not re.fullmatch(r"[0-9]{1,18}", value):
            raise st.ApiError(400, "bad_if_match", 'If-Match must be a revision number, e.g. "12"')
        return int(value)

    @staticmethod
    def _who(request: web.Request) -> str:
        principal = request[PRINCIPAL]
        return principal.name

    def _version_view(self, rec: VersionEndpoint) -> web.Response:
        view = rec.model_copy(update={"url": self.c.url(rec.project, f"{rec.model}-{rec.version}")})
        return web.json_response(
            json.loads(view.model_dump_json()), headers={"ETag": f'"{rec.generation}"'}
        )

    def _endpoint_view(self, rec: ModelEndpoint, status: int = 200) -> web.Response:
        view = rec.model_copy(update={"url": self.c.url(rec.project, rec.model)})
        return web.json_response(
            json.loads(view.model_dump_json()), status=status, headers={"ETag": f'"{rec.revision}"'}
        )

    def _no_cluster_versions(self, spec: VersionEndpointSpec | None) -> None:
        if self.c.cluster is not None:
            raise st.ApiError(
                409, "managed_by_kubernetes",
                "in Kubernetes mode a version endpoint is a Deployment and a Service you apply "
                "with its labels (docs/kubernetes.md); the API only routes traffic",
            )  # fmt: skip
        if spec is not None and spec.type == "kubernetes":
            raise _Invalid([{"path": "type", "message": "kubernetes is set by the controller "
                             "in Kubernetes mode; use custom, pyfunc or sklearn"}])  # fmt: skip

    async def _audit(self, request: web.Request, action: str, target: str) -> dict[str, Any]:
        return {"who": self._who(request), "action": action, "target": target}

    # --- handlers -------------------------------------------------------------------

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "revision": self.c.state.revision})

    async def readyz(self, _: web.Request) -> web.Response:
        """Ready to be the one gateways follow (in Kubernetes mode: synced and leading)."""
        ready, why = self.c.ready()
        body = {"ready": ready, "reason": why, "revision": self.c.state.revision}
        return web.json_response(body, status=200 if ready else 503)

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def audit(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        if not principal.may("read", None):
            raise st.ApiError(403, "forbidden", "the audit log needs read access to all projects")
        try:
            limit = min(int(request.query.get("limit", "100")), 1000)
        except ValueError:
            raise _Invalid([{"path": "limit", "message": "a whole number"}]) from None
        return web.json_response({"entries": await self.c.store.read_audit(max(limit, 1))})

    async def routes(self, request: web.Request) -> web.StreamResponse:
        principal = request[PRINCIPAL]
        if not principal.may("read", None):
            raise st.ApiError(403, "forbidden", "the route table needs read access to all projects")
        if request.query.get("watch") not in ("1", "true"):
            _, data = self.c.feed.current()
            return web.Response(body=data, content_type="application/json")
        try:
            since = int(request.query.get("since", "-1"))
        except ValueError:
            raise _Invalid([{"path": "since", "message": "a revision number"}]) from None
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        while True:
            newer = await self.c.feed.wait_newer(since, WATCH_HEARTBEAT_SECONDS)
            if self.c.feed.closed:
                return resp  # shutting down: the gateway reconnects to whoever comes next
            if newer is None:
                await resp.write(b"\n")  # heartbeat: lets both ends notice a dead peer
                continue
            since, data = newer  # the revision actually sent, not whatever is newest now
            await resp.write(data + b"\n")

    async def metrics(self, request: web.Request) -> web.Response:
        """The attached autoscaler's metrics (decisions, signals, missing data)."""
        principal = request[PRINCIPAL]
        if not principal.may("read", None):
            raise st.ApiError(403, "forbidden", "metrics need read access to all projects")
        text = "".join(render() for render in self.c.metrics)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def activate(self, request: web.Request) -> web.Response:
        """A gateway's poke: requests wait for a version at zero; start it now."""
        body = await self._body(request, ActivationBody)
        principal = request[PRINCIPAL]
        if not principal.may("read", body.project):
            raise st.ApiError(403, "forbidden", f"{principal.name} may not read {body.project}")
        key = st.version_key(body.project, body.model, body.version)
        rec = self.c.state.versions.get(key)
        if rec is None or rec.status not in st.DEPLOYED:
            raise st.not_found(f"version endpoint {key}")
        if self.c.activations is None:
            raise st.ApiError(503, "no_autoscaler", "no autoscaler is attached to this controller")
        self.c.activations(key, body.waiting)
        return web.json_response({"accepted": key, "waiting": body.waiting}, status=202)

    async def list_versions(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "read")
        items = [
            json.loads(v.model_dump_json())
            for v in self.c.state.versions.values()
            if v.project == project and v.model == model
        ]
        return web.json_response({"versions": items})

    async def deploy(self, request: web.Request) -> web.Response:
        project, model, version = self._names(request, "write")
        assert version is not None
        spec = await self._body(request, VersionEndpointSpec)
        self._no_cluster_versions(spec)
        if_match = self._if_match(request)
        key = st.version_key(project, model, version)
        new = await self.c.change(
            lambda s: st.deploy(s, project, model, version, spec,
                                max_versions=self.c.max_versions, if_match=if_match),
            await self._audit(request, "deploy", key),
        )  # fmt: skip
        await self.c.reconcile_runtime()
        resp = self._version_view(new.versions[key])
        resp.set_status(202)
        return resp

    async def get_version(self, request: web.Request) -> web.Response:
        project, model, version = self._names(request, "read")
        assert version is not None
        rec = self.c.state.versions.get(st.version_key(project, model, version))
        if rec is None:
            raise st.not_found(f"version endpoint {project}/{model}/{version}")
        return self._version_view(rec)

    async def undeploy(self, request: web.Request) -> web.Response:
        project, model, version = self._names(request, "write")
        assert version is not None
        key = st.version_key(project, model, version)
        if_match = self._if_match(request)
        self._no_cluster_versions(None)
        new = await self.c.change(
            lambda s: st.undeploy(s, project, model, version, if_match),
            await self._audit(request, "undeploy", key),
        )
        await self.c.reconcile_runtime()
        return self._version_view(new.versions[key])

    async def put_endpoint(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "write")
        body = await self._body(request, ModelEndpointBody)
        if_match = self._if_match(request)
        key = st.model_key(project, model)
        existed = key in self.c.state.endpoints
        new = await self.c.change(
            lambda s: st.set_endpoint(s, project, model, body, by=self._who(request),
                                      now=time.time(), if_match=if_match),
            await self._audit(request, "set_endpoint", key) | {"rule": body.rule.model_dump()},
        )  # fmt: skip
        return self._endpoint_view(new.endpoints[key], 200 if existed else 201)

    async def get_endpoint(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "read")
        rec = self.c.state.endpoints.get(st.model_key(project, model))
        if rec is None:
            raise st.not_found(f"model endpoint {project}/{model}")
        return self._endpoint_view(rec)

    async def delete_endpoint(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "write")
        key = st.model_key(project, model)
        if_match = self._if_match(request)
        new = await self.c.change(
            lambda s: st.delete_endpoint(s, project, model, if_match),
            await self._audit(request, "delete_endpoint", key),
        )
        return web.json_response({"deleted": key, "revision": new.revision})

    async def history(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "read")
        entries = self.c.state.history.get(st.model_key(project, model), [])
        return web.json_response({"history": [json.loads(h.model_dump_json()) for h in entries]})

    async def switch(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "write")
        body = await self._body(request, SwitchBody, allow_empty=True)
        if_match = self._if_match(request)
        key = st.model_key(project, model)
        new = await self.c.change(
            lambda s: st.switch(s, project, model, body.to_version, by=self._who(request),
                                now=time.time(), if_match=if_match),
            await self._audit(request, "switch", key),
        )  # fmt: skip
        return self._endpoint_view(new.endpoints[key])

    async def rollback(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "write")
        body = await self._body(request, RollbackBody, allow_empty=True)
        if_match = self._if_match(request)
        key = st.model_key(project, model)
        new = await self.c.change(
            lambda s: st.rollback(s, project, model, body.to_revision, by=self._who(request),
                                  now=time.time(), if_match=if_match),
            await self._audit(request, "rollback", key),
        )  # fmt: skip
        return self._endpoint_view(new.endpoints[key])


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class _Invalid(st.ApiError):
    def __init__(self, fields: list[dict[str, str]]) -> None:
        summary = "; ".join(f"{f['path']}: {f['message']}" for f in fields)
        super().__init__(422, "invalid", summary)
        self.fields = fields
