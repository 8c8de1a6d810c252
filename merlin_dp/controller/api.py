"""The controller's HTTP API (aiohttp), its errors, auth and OpenAPI document.

Routes under ``/v1/projects/{project}/models/{model}``: version endpoints
(``versions/{version}/endpoint``; ``versions/{version}/logs``, the replicas' logs), the
model endpoint (``endpoint``, ``endpoint:switch``,
``endpoint:rollback``, ``endpoint/history``), plus ``/v1/routes`` (with ``watch=1`` a
newline-delimited JSON stream of whole route tables for gateways), ``/v1/audit``,
``/openapi.json``, ``/healthz``, ``POST /v1/activations`` (a gateway's poke for a version
at zero) and ``/metrics`` (the attached autoscaler's). Errors are
``{"error": {"code", "message", "fields"}}``: 400 malformed JSON, 401/403 auth, 404
unknown, 405 method not allowed (with ``Allow``), 409 forbidden by the current state, 412
stale ``If-Match``, 413 body too large, 422 invalid body, path or query parameter (with
field paths; a query parameter the operation doesn't take is refused too), 503 store or
autoscaler unavailable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from merlin_dp.controller import state as st
from merlin_dp.controller.auth import Access, Principal, Tokens, host_refusals
from merlin_dp.controller.models import (
    ActivationAccepted,
    ActivationBody,
    ControllerState,
    EndpointDeleted,
    Health,
    ModelEndpoint,
    ModelEndpointBody,
    Readiness,
    ReplicaLog,
    RollbackBody,
    RuleHistory,
    SwitchBody,
    VersionEndpoint,
    VersionEndpointList,
    VersionLogs,
    WhoAmI,
)
from merlin_dp.controller.openapi import (
    AUDIT_LIMIT_MAX,
    LOG_FILES_MAX,
    LOG_LINES_MAX,
    SINCE_MAX,
    WATCH_VALUES,
    openapi_document,
    query_parameters,
)
from merlin_dp.controller.rollouts import RESULTS
from merlin_dp.controller.service import Controller
from merlin_dp.controller.store import StoreError
from merlin_dp.controller.timeseries import TimeSeries
from merlin_dp.runtime.logtail import LogFollower, log_tail
from merlin_dp.spec.endpoints import (
    VersionEndpointSpec,
)
from merlin_dp.spec.rollout import RolloutPlan
from merlin_dp.spec.rule import NAME_PATTERN, VERSION_PATTERN

log = logging.getLogger("merlin_dp.controller.api")
Model = TypeVar("Model", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRINCIPAL = web.RequestKey("principal", Principal)
MAX_BODY = 1024 * 1024
# The web console: static files served under CONSOLE_PREFIX, without a token.
CONSOLE_DIR = Path(__file__).with_name("console")
CONSOLE_PREFIX = "/ui/"
CONSOLE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png",
                 ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8",
                 ".md": "text/plain; charset=utf-8"}  # fmt: skip
LOG_POLL_SECONDS = 0.5
WATCH_HEARTBEAT_SECONDS = 15.0


def error(
    status: int,
    code: str,
    message: str,
    fields: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message, "fields": fields or []}}
    return web.json_response(body, status=status, headers=headers)


def answer(model: BaseModel, status: int = 200) -> web.Response:
    """A documented answer: built from its model, so it is what /openapi.json says."""
    return web.json_response(model.model_dump(mode="json"), status=status)


def make_app(
    controller: Controller, tokens: Tokens, model_roots: tuple[str, ...] = ()
) -> web.Application:
    """``model_roots``: resolved directories a token without host may deploy from."""

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
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))  # RFC 9110: a 405 says what is
            return error(405, "method_not_allowed",
                         f"{request.method} is not allowed on {request.path}; allowed: {allowed}",
                         headers={"Allow": allowed})  # fmt: skip
        except web.HTTPNotFound:
            if request.path == CONSOLE_PREFIX.rstrip("/"):  # a console typed without its /
                raise web.HTTPPermanentRedirect(CONSOLE_PREFIX) from None
            return error(404, "not_found", f"the API has no path {request.path}")
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
        if request.path in ("/healthz", "/readyz", "/openapi.json") or request.path.startswith(
            CONSOLE_PREFIX
        ):
            # The console's files hold no data: every call the page makes carries a token.
            return await handler(request)
        principal = tokens.authenticate(request.headers.get("Authorization"))
        if principal is None:
            return error(401, "unauthorized", "a valid bearer token is required",
                         headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        request[PRINCIPAL] = principal
        return await handler(request)

    takes = query_parameters()

    @web.middleware
    async def query(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Like unknown body fields, a query parameter the operation doesn't take is an
        # error, not silently ignored (a typo'd ?wacth=1 would otherwise get a table).
        resource = request.match_info.route.resource
        if resource is not None:
            method = "GET" if request.method == "HEAD" else request.method
            names = takes.get((resource.canonical, method))
            if names is not None:
                _check_query_names(request, names)
        return await handler(request)

    api = Api(controller, model_roots)
    app = web.Application(middlewares=[errors, auth, query], client_max_size=MAX_BODY)
    base = "/v1/projects/{project}/models/{model}"
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/openapi.json", api.openapi)
    app.router.add_get(CONSOLE_PREFIX + "{path:.*}", api.console)
    app.router.add_get("/v1/routes", api.routes)
    app.router.add_get("/v1/whoami", api.whoami)
    app.router.add_get("/v1/overview", api.overview)
    app.router.add_get("/v1/audit", api.audit)
    app.router.add_post("/v1/activations", api.activate)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get(base + "/versions", api.list_versions)
    app.router.add_put(base + "/versions/{version}/endpoint", api.deploy)
    app.router.add_get(base + "/versions/{version}/endpoint", api.get_version)
    app.router.add_delete(base + "/versions/{version}/endpoint", api.undeploy)
    app.router.add_get(base + "/versions/{version}/logs", api.logs)
    app.router.add_put(base + "/endpoint", api.put_endpoint)
    app.router.add_get(base + "/endpoint", api.get_endpoint)
    app.router.add_delete(base + "/endpoint", api.delete_endpoint)
    app.router.add_get(base + "/endpoint/history", api.history)
    app.router.add_get(base + "/series", api.series)
    app.router.add_post(base + "/endpoint:switch", api.switch)
    app.router.add_post(base + "/endpoint:rollback", api.rollback)
    app.router.add_post(base + "/endpoint:rollout", api.start_rollout)
    app.router.add_get(base + "/endpoint/rollout", api.get_rollout)
    app.router.add_post(base + "/endpoint/rollout:pause", api.pause_rollout)
    app.router.add_post(base + "/endpoint/rollout:resume", api.resume_rollout)
    app.router.add_post(base + "/endpoint/rollout:abort", api.abort_rollout)
    return app


class Api:
    def __init__(self, controller: Controller, model_roots: tuple[str, ...] = ()) -> None:
        self.c = controller
        self.model_roots = model_roots

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
        repeated: list[_Repeated] = []

        def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            obj = _object(pairs)
            if isinstance(obj, _Repeated):
                repeated.append(obj)
            return obj

        try:
            data = json.loads(raw, parse_constant=_no_constants, object_pairs_hook=pairs_hook)
        except (ValueError, RecursionError) as exc:
            raise st.ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
        if repeated:
            raise _Invalid([{"path": p, "message": "given more than once in one object"}
                            for p in _repeated_paths(data)])  # fmt: skip
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise _Invalid(
                [
                    {"path": ".".join(str(p) for p in e["loc"]) or "(body)",
                     "message": JSON_TERMS.get(e["type"], e["msg"].removeprefix("Value error, "))}
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

    def _with_url(self, rec: VersionEndpoint) -> VersionEndpoint:
        url = self.c.url(rec.project, f"{rec.model}-{rec.version}", rec.spec.protocol)
        return rec.model_copy(update={"url": url})

    def _version_view(self, rec: VersionEndpoint) -> web.Response:
        view = self._with_url(rec)
        return web.json_response(
            json.loads(view.model_dump_json()), headers={"ETag": f'"{rec.generation}"'}
        )

    def _endpoint_view(self, rec: ModelEndpoint, status: int = 200) -> web.Response:
        view = rec.model_copy(update={"url": self.c.url(rec.project, rec.model, rec.protocol)})
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

    def _host_permission(self, request: web.Request, spec: VersionEndpointSpec) -> None:
        """A project's writers are contained to it: what would run code of their choosing
        on this host (and so reach every project and the controller's own secrets) needs
        the token's host permission."""
        principal = request[PRINCIPAL]
        refusals = [] if principal.host else host_refusals(spec, self.model_roots)
        if refusals:
            raise _Forbidden(
                f"{principal.name} lacks the host permission (a token with host: true), "
                "needed to run a command or name a path on the controller's host; without "
                "it, deploy pyfunc or sklearn from a --model-root directory",
                refusals,
            )

    async def _audit(self, request: web.Request, action: str, target: str) -> dict[str, Any]:
        return {"who": self._who(request), "action": action, "target": target}

    # --- handlers -------------------------------------------------------------------

    async def healthz(self, _: web.Request) -> web.Response:
        return answer(Health(status="ok", revision=self.c.state.revision))

    async def readyz(self, _: web.Request) -> web.Response:
        """Ready to be the one gateways follow (in Kubernetes mode: synced and leading)."""
        ready, why = self.c.ready()
        body = Readiness(ready=ready, reason=why, revision=self.c.state.revision)
        return answer(body, 200 if ready else 503)

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def audit(self, request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        if not principal.may("read", None):
            raise st.ApiError(403, "forbidden", "the audit log needs read access to all projects")
        limit = _query_int(request, "limit", 100, 1, AUDIT_LIMIT_MAX)
        # Entries go out as stored (AuditLog in the document lists the fields they have):
        # validating old lines on the way out could only turn them into 500s.
        return web.json_response({"entries": await self.c.store.read_audit(limit)})

    async def routes(self, request: web.Request) -> web.StreamResponse:
        principal = request[PRINCIPAL]
        if not principal.may("read", None):
            raise st.ApiError(403, "forbidden", "the route table needs read access to all projects")
        watch = request.query.get("watch", "0")
        if watch not in WATCH_VALUES:
            raise _Invalid([{"path": "watch", "message": f"one of {', '.join(WATCH_VALUES)}"}])
        since = _query_int(request, "since", -1, -1, SINCE_MAX)
        if watch in ("0", "false"):
            _, data = self.c.feed.current()
            return web.Response(body=data, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            while True:
                newer = await self.c.feed.wait_newer(since, WATCH_HEARTBEAT_SECONDS)
                if self.c.feed.closed:
                    return resp  # shutting down: the gateway reconnects to whoever is next
                if newer is None:
                    await resp.write(b"\n")  # heartbeat: lets both ends notice a dead peer
                    continue
                since, data = newer  # the revision actually sent, not whatever is newest now
                await resp.write(data + b"\n")
        except ConnectionResetError:
            # The watcher left before its cancellation arrived (it closed right after the
            # head): nothing to answer, and nothing went wrong here.
            return resp

    async def console(self, request: web.Request) -> web.StreamResponse:
        """The web console's files (controller/console/), index.html for the folder."""
        wanted = request.match_info["path"] or "index.html"
        root = CONSOLE_DIR.resolve()
        path = (root / wanted).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise st.not_found(f"console file {wanted}")
        kind = CONSOLE_TYPES.get(path.suffix, "application/octet-stream")
        return web.FileResponse(path, headers={"Content-Type": kind,
                                               "X-Content-Type-Options": "nosniff",
                                               "Cache-Control": "no-cache"})  # fmt: skip

    async def whoami(self, request: web.Request) -> web.Response:
        p = request[PRINCIPAL]
        return answer(WhoAmI(name=p.name, access=p.access, projects=sorted(p.projects),
                             host=p.host))  # fmt: skip

    async def overview(self, request: web.Request) -> web.Response:
        """Every model the caller may read, with each version's last seconds."""
        principal = request[PRINCIPAL]
        series = self._series()
        whole = series.overview(self.c.url)
        mine = [m for m in whole.models if principal.may("read", m.project)]
        return answer(whole.model_copy(update={"models": mine}))

    async def series(self, request: web.Request) -> web.StreamResponse:
        """A model's last minutes per version and second; with watch, each new second."""
        project, model, _ = self._names(request, "read")
        watch = request.query.get("watch", "0")
        if watch not in WATCH_VALUES:
            raise _Invalid([{"path": "watch", "message": f"one of {', '.join(WATCH_VALUES)}"}])
        since = _query_int(request, "since", -1, -1, SINCE_MAX)
        series = self._series()
        if watch in ("0", "false"):
            return answer(series.model_series(project, model, since))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            while True:
                if since < series.until:
                    now = series.model_series(project, model, since)
                    await resp.write(now.model_dump_json().encode() + b"\n")
                    since = now.until
                elif not await series.wait_newer(since, WATCH_HEARTBEAT_SECONDS):
                    await resp.write(b"\n")  # heartbeat: lets both ends notice a dead peer
        except ConnectionResetError:
            return resp

    def _series(self) -> TimeSeries:
        if self.c.series is None:
            raise st.ApiError(503, "no_time_series", "this controller keeps no time series")
        return self.c.series

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
        return answer(ActivationAccepted(accepted=key, waiting=body.waiting), 202)

    async def list_versions(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "read")
        items = [
            self._with_url(v)
            for v in self.c.state.versions.values()
            if v.project == project and v.model == model
        ]
        return answer(VersionEndpointList(versions=items))

    async def deploy(self, request: web.Request) -> web.Response:
        project, model, version = self._names(request, "write")
        assert version is not None
        spec = await self._body(request, VersionEndpointSpec)
        self._no_cluster_versions(spec)
        self._host_permission(request, spec)
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

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """The last lines of each of a version's replica logs; with follow, a text stream
        of them and then of every line written after, until the client leaves."""
        project, model, version = self._names(request, "read")
        assert version is not None
        lines = _query_int(request, "lines", 50, 0, LOG_LINES_MAX)
        follow = request.query.get("follow", "0")
        if follow not in WATCH_VALUES:
            raise _Invalid([{"path": "follow", "message": f"one of {', '.join(WATCH_VALUES)}"}])
        key = st.version_key(project, model, version)
        if key not in self.c.state.versions:
            raise st.not_found(f"version endpoint {key}")
        runtime = self.c.runtime
        if runtime is None:
            raise st.ApiError(
                409, "no_runtime", "this controller runs no replicas (--runtime none, or "
                "Kubernetes mode): read their logs where they run",
            )  # fmt: skip
        if follow in ("0", "false"):
            paths = [Path(p) for p in runtime.logs(key)]
            shown = paths[-LOG_FILES_MAX:]
            tails = await asyncio.to_thread(
                lambda: [ReplicaLog(name=p.name, lines=log_tail(p, lines)[0]) for p in shown]
            )
            return answer(VersionLogs(logs=tails, omitted=len(paths) - len(shown)))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        follower = LogFollower(lines)
        while not self.c.feed.closed:  # closed first when the controller stops
            paths = [Path(p) for p in runtime.logs(key)][-LOG_FILES_MAX:]
            text = await asyncio.to_thread(follower.read, paths)
            if text:
                await resp.write(text.encode())
            await asyncio.sleep(LOG_POLL_SECONDS)
        return resp

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
        return answer(EndpointDeleted(deleted=key, revision=new.revision))

    async def history(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "read")
        entries = self.c.state.history.get(st.model_key(project, model), [])
        return answer(RuleHistory(history=entries))

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

    # --- rollouts -------------------------------------------------------------------

    async def start_rollout(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "write")
        plan = await self._body(request, RolloutPlan)
        if_match = self._if_match(request)
        key = st.model_key(project, model)
        if self.c.rollouts is None:
            raise st.conflict(
                "rollouts are judged on the gateways' signals and this controller reads none: "
                "start it with --gateway-admin, --redis-signals or --gateway-admin-service"
            )
        new = await self.c.change(
            lambda s: st.start_rollout(s, project, model, plan, by=self._who(request),
                                       now=time.time(), if_match=if_match),
            await self._audit(request, "rollout_start", key) | {"candidate": plan.candidate},
        )  # fmt: skip
        self.c.rollouts.count("started")
        return self._rollout_view(key, new, 201)

    async def get_rollout(self, request: web.Request) -> web.Response:
        project, model, _ = self._names(request, "read")
        key = st.model_key(project, model)
        status = self.c.rollouts.status(key) if self.c.rollouts else None
        status = status or self.c.state.rollouts.get(key)
        if status is None:
            raise st.not_found(f"rollout of {key}")
        return answer(status)

    async def pause_rollout(self, request: web.Request) -> web.Response:
        return await self._rollout_action(request, "pause", st.pause_rollout)

    async def resume_rollout(self, request: web.Request) -> web.Response:
        return await self._rollout_action(request, "resume", st.resume_rollout)

    async def abort_rollout(self, request: web.Request) -> web.Response:
        return await self._rollout_action(request, "abort", st.abort_rollout)

    async def _rollout_action(
        self, request: web.Request, action: str, transition: st.RolloutAction
    ) -> web.Response:
        project, model, _ = self._names(request, "write")
        key = st.model_key(project, model)
        who = self._who(request)
        new = await self.c.change(
            lambda s: transition(s, key, by=who, now=time.time()),
            await self._audit(request, f"rollout_{action}", key),
        )
        if self.c.rollouts is not None:
            self.c.rollouts.count(RESULTS[action])
        return self._rollout_view(key, new)

    def _rollout_view(self, key: str, state: ControllerState, code: int = 200) -> web.Response:
        status = state.rollouts[key]
        endpoint = state.endpoints.get(key)
        headers = {"ETag": f'"{endpoint.revision}"'} if endpoint else None
        return web.json_response(json.loads(status.model_dump_json()), status=code,
                                 headers=headers)  # fmt: skip


# Pydantic words these in Python's terms ("a valid dictionary or instance of Rule").
JSON_TERMS = {
    "model_type": "Input should be a JSON object",
    "model_attributes_type": "Input should be a JSON object",
    "dict_type": "Input should be a JSON object",
    "list_type": "Input should be a JSON array",
}


def _check_query_names(request: web.Request, takes: frozenset[str]) -> None:
    problems = []
    for name in sorted(set(request.query)):
        if name not in takes:
            which = ", ".join(sorted(takes)) or "none"
            message = f"not a query parameter here (this operation takes {which})"
            problems.append({"path": name or "(query)", "message": message})
        elif len(request.query.getall(name)) > 1:
            problems.append({"path": name, "message": "given more than once"})
    if problems:
        raise _Invalid(problems)


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # Digits only: int() would also take " 7", "+7" and "1_000".
    if re.fullmatch(r"-?[0-9]{1,18}", raw) and low <= int(raw) <= high:
        return int(raw)
    raise _Invalid([{"path": name, "message": f"a whole number from {low} to {high}"}])


class _Repeated(dict[str, Any]):
    """A JSON object that named some keys more than once (json.loads keeps the last)."""

    repeated: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Refused rather than "last wins": a proxy, a logger or another parser may have read
    # the first, and the body would mean different things to each.
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _Repeated(obj)
    seen: set[str] = set()
    marked.repeated = []
    for key, _ in pairs:
        if key in seen and key not in marked.repeated:
            marked.repeated.append(key)
        seen.add(key)
    return marked


def _repeated_paths(data: Any) -> list[str]:
    """Each repeated key's path (rule.destinations.0.weight), outer objects first."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # a loop, not recursion: nesting as deep as the parser took is fine
        where, node = stack.pop()
        if isinstance(node, _Repeated):
            found += [where + key for key in node.repeated]
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()  # fmt: skip
        stack += reversed([(f"{where}{k}.", v) for k, v in items])
    return found


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class _Forbidden(st.ApiError):
    def __init__(self, why: str, fields: list[dict[str, str]]) -> None:
        summary = "; ".join(f"{f['path']}: {f['message']}" for f in fields)
        super().__init__(403, "forbidden", f"{why}. {summary}")
        self.fields = fields


class _Invalid(st.ApiError):
    def __init__(self, fields: list[dict[str, str]]) -> None:
        summary = "; ".join(f"{f['path']}: {f['message']}" for f in fields)
        super().__init__(422, "invalid", summary)
        self.fields = fields
