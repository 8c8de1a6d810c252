"""The OpenAPI 3.1 document, generated from the API's pydantic models.

Schemas come from the models themselves (``pydantic.json_schema.models_json_schema``),
and the handlers build their answers from the same models, so the document can't drift
from what the API validates or returns. The paths list every operation the app serves
(tests/test_openapi_document.py compares them with the router), each with an
``operationId``, its parameters, body and every status it answers. The API refuses a
query parameter an operation doesn't list here (``query_parameters``).

Component names are part of the API — generated clients name their classes after them —
so each is its class's name: there is one class per concept, and two classes with one
name stop the document from being built (pydantic would name them after their modules,
and only while they clash).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from merlin_dp.controller.models import (
    ActivationAccepted,
    ActivationBody,
    AuditEntry,
    AuditLog,
    EndpointDeleted,
    ErrorBody,
    ErrorResponse,
    FieldError,
    Health,
    ModelEndpoint,
    ModelEndpointBody,
    ModelSeries,
    ModelSummary,
    Overview,
    Readiness,
    ReplicaLog,
    RollbackBody,
    RuleHistory,
    RuleRevision,
    ScaleEvent,
    SeriesPoint,
    SwitchBody,
    VersionEndpoint,
    VersionEndpointList,
    VersionLogs,
    VersionSeries,
    VersionSummary,
    WhoAmI,
)
from merlin_dp.spec.endpoints import (
    AutoscalingPolicy,
    ModelEndpointSpec,
    ResourceRequest,
    VersionEndpointSpec,
)
from merlin_dp.spec.rollout import (
    Analysis,
    Evidence,
    Judgement,
    RolloutDecision,
    RolloutPlan,
    RolloutStatus,
    Tally,
)
from merlin_dp.spec.routes import RouteTableSpec, RouteTableVersionEndpoint
from merlin_dp.spec.rule import (
    NAME_PATTERN,
    VERSION_PATTERN,
    Destination,
    HeaderMatch,
    Mirror,
    Rule,
    Sticky,
)

# Every model the document shows, nested ones included: a model missing here is an error
# when the document is built, not a component named by chance.
MODELS: list[type[BaseModel]] = [
    ActivationAccepted, ActivationBody, AuditEntry, AuditLog, AutoscalingPolicy, Destination,
    EndpointDeleted, ErrorBody, ErrorResponse, FieldError, Health, HeaderMatch, Mirror,
    ModelEndpoint, ModelEndpointBody, Readiness, ReplicaLog, ResourceRequest, RollbackBody,
    ModelEndpointSpec, RouteTableSpec, RouteTableVersionEndpoint, Rule, RuleHistory,
    RuleRevision, Sticky, SwitchBody, VersionEndpoint, VersionEndpointList, VersionEndpointSpec,
    VersionLogs, Analysis, Evidence, Judgement, RolloutDecision, RolloutPlan, RolloutStatus, Tally,
    WhoAmI, SeriesPoint, VersionSeries, ScaleEvent, ModelSeries, VersionSummary, ModelSummary,
    Overview,
]  # fmt: skip

WATCH_VALUES = ("0", "1", "false", "true")
SINCE_MAX = 10**18 - 1
AUDIT_LIMIT_MAX = 1000
LOG_LINES_MAX = 10_000
LOG_FILES_MAX = 50  # a version's newest log files shown; a log file per replica per run
BASE = "/v1/projects/{project}/models/{model}"
METHOD_ORDER = ("parameters", "get", "head", "put", "post", "patch", "delete")
TAGS = {
    "Console": "The web console and what it reads: who the caller is, every model at a "
    "glance, each model's last minutes per second (docs/console.md).",
    "Gateways": "What gateways call: the route table and its stream, activations.",
    "Model endpoints": "A model's traffic rule: weights, matches, stickiness, mirroring.",
    "Operations": "Health, readiness, metrics, the audit log and this document.",
    "Rollouts": "Moving a model endpoint's traffic to a candidate version by itself: "
    "shadow, canary steps, promotion, judged on the gateways' signals (docs/rollouts.md).",
    "Version endpoints": "Deploying and undeploying the versions of a model.",
}


def component_name(model: type[BaseModel]) -> str:
    return model.__name__


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{component_name(model)}"}


def _schemas() -> dict[str, Any]:
    refs, defs = models_json_schema([(m, "validation") for m in MODELS])
    rename: dict[str, str] = {}
    for (model, _), schema in refs.items():
        name = component_name(model)  # type: ignore[arg-type]  # keys are the classes given
        if name in rename.values():
            raise RuntimeError(f"two models are called {name}: one class per concept")
        rename[schema["$ref"].removeprefix("#/$defs/")] = name
    stray = sorted(set(defs.get("$defs", {})) - set(rename))
    if stray:
        raise RuntimeError(f"models shown in the document but not listed in MODELS: {stray}")

    def relink(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: relink(v) for k, v in node.items()}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                out["$ref"] = f"#/components/schemas/{rename[ref.removeprefix('#/$defs/')]}"
            return out
        if isinstance(node, list):
            return [relink(v) for v in node]
        return node

    schemas = {rename[old]: relink(schema) for old, schema in defs["$defs"].items()}
    for name, schema in schemas.items():
        schema["title"] = name
    return dict(sorted(schemas.items()))


def _json(schema: type[BaseModel] | dict[str, Any], description: str) -> dict[str, Any]:
    body = _ref(schema) if isinstance(schema, type) else schema
    return {"description": description, "content": {"application/json": {"schema": body}}}


ERRORS = {
    400: "Malformed JSON body or If-Match header",
    401: "Missing or unknown bearer token",
    403: "The token may not do this",
    404: "No such version endpoint, model endpoint or rule revision",
    409: "Refused by the current state (Merlin's rules), or managed by Kubernetes",
    412: "If-Match names a revision that is no longer current",
    413: "Body over 1 MiB",
    422: "Invalid body (a key given twice in one object too), path or query parameter "
    "(fields name each)",
    503: "A dependency is unavailable (state store, Kubernetes API, autoscaler); nothing changed",
}  # fmt: skip
ETAG = {"ETag": {"description": "The revision to send back as If-Match.",
                 "schema": {"type": "string"}}}  # fmt: skip


def _errors(*codes: int, notes: dict[int, str] | None = None) -> dict[str, Any]:
    said = {**ERRORS, **(notes or {})}
    out = {str(c): _json(ErrorResponse, said[c]) for c in sorted(codes)}
    if "401" in out:
        out["401"]["headers"] = {"WWW-Authenticate": {
            "description": "Bearer (RFC 6750)", "schema": {"type": "string"}}}  # fmt: skip
    return out


def _op(
    summary: str,
    ok: dict[str, Any],
    errors: tuple[int, ...] = (),
    body: type[BaseModel] | None = None,
    *,
    op: str,
    body_required: bool = True,
    if_match: bool = False,
    query: tuple[dict[str, Any], ...] = (),
    public: bool = False,
    notes: dict[int, str] | None = None,
) -> dict[str, Any]:
    # Every operation may answer 422: unknown query parameters are refused everywhere.
    codes = {*errors, 422} | (set() if public else {401, 403})
    result: dict[str, Any] = {"operationId": op, "summary": summary,
                              "responses": {**ok, **_errors(*codes, notes=notes)}}  # fmt: skip
    if public:
        result["security"] = []
    if body is not None:
        result["requestBody"] = {
            "required": body_required,
            "description": "JSON; unknown fields are refused"
            + ("" if body_required else "; may be empty"),
            "content": {"application/json": {"schema": _ref(body)}},
        }
    params = list(query)
    if if_match:
        params.append({"name": "If-Match", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": r'^(W/)?"?[0-9]{1,18}"?$'},
                       "description": "The revision you read (its ETag); 412 if it is stale."})  # fmt: skip
    if params:
        result["parameters"] = params
    return result


@cache
def openapi_document() -> dict[str, Any]:
    def path_param(name: str, pattern: str, max_length: int, what: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "description": what,
                "schema": {"type": "string", "pattern": pattern, "maxLength": max_length}}  # fmt: skip

    params = [
        path_param("project", NAME_PATTERN, 63, "Project: lowercase letters, digits and dashes."),
        path_param("model", NAME_PATTERN, 63, "Model: lowercase letters, digits and dashes."),
    ]
    version = path_param("version", VERSION_PATTERN, 32, "Version: lowercase letters, digits and dots.")  # fmt: skip
    watch = {"name": "watch", "in": "query", "required": False,
             "description": "1 or true: answer with a stream of whole tables (NDJSON) instead.",
             "schema": {"type": "string", "enum": list(WATCH_VALUES), "default": "0"}}  # fmt: skip
    since = {"name": "since", "in": "query", "required": False,
             "description": "With watch: the revision you have; the stream starts after it.",
             "schema": {"type": "integer", "minimum": -1, "maximum": SINCE_MAX, "default": -1}}  # fmt: skip
    lines = {"name": "lines", "in": "query", "required": False,
             "description": "Lines from the end of each log.",
             "schema": {"type": "integer", "minimum": 0, "maximum": LOG_LINES_MAX, "default": 50}}  # fmt: skip
    follow = {"name": "follow", "in": "query", "required": False,
              "description": "1 or true: answer with a text stream instead: the last lines, "
              "then every line written after (tail -f), until the client leaves.",
              "schema": {"type": "string", "enum": list(WATCH_VALUES), "default": "0"}}  # fmt: skip
    limit = {"name": "limit", "in": "query", "required": False,
             "description": "The most recent entries to return.",
             "schema": {"type": "integer", "minimum": 1, "maximum": AUDIT_LIMIT_MAX, "default": 100}}  # fmt: skip
    since_second = {"name": "since", "in": "query", "required": False,
                    "description": "The newest second (unix) you have: only later ones are "
                    "returned (and, with watch, streamed).",
                    "schema": {"type": "integer", "minimum": -1, "maximum": SINCE_MAX, "default": -1}}  # fmt: skip
    series_watch = {**watch, "description": "1 or true: answer with a stream (NDJSON): the "
                    "series, then one line a second with only the new seconds and events, and "
                    "an empty line every 15 s while none come."}  # fmt: skip
    console_file = {"name": "path", "in": "path", "required": True,
                    "description": "A file of the console (index.html when empty).",
                    "schema": {"type": "string"}}  # fmt: skip
    version_ok = {"200": {**_json(VersionEndpoint, "The version endpoint"), "headers": ETAG}}
    endpoint_ok = {"200": {**_json(ModelEndpoint, "The model endpoint"), "headers": ETAG}}
    paths: dict[str, Any] = {
        "/healthz": {"get": _op(
            "Liveness: the controller answers",
            {"200": _json(Health, "Alive")}, op="getHealth", public=True)},
        "/readyz": {"get": _op(
            "Readiness: gateways may follow this controller (Kubernetes mode: synced and leading)",
            {"200": _json(Readiness, "Ready"), "503": _json(Readiness, "Not ready; reason says why")},
            op="getReadiness", public=True)},
        "/openapi.json": {"get": _op(
            "This document",
            {"200": _json({"type": "object"}, "The OpenAPI 3.1 document")},
            op="getOpenApiDocument", public=True)},
        "/ui/{path}": {"parameters": [console_file], "get": _op(
            "The web console's files (docs/console.md); the page asks for a token and "
            "sends it with every API call it makes",
            {"200": {"description": "HTML, JavaScript, CSS or an image",
                     "content": {"text/html": {"schema": {"type": "string"}},
                                 "text/javascript": {"schema": {"type": "string"}},
                                 "text/css": {"schema": {"type": "string"}}}}},
            (404,), op="getConsoleFile", public=True)},
        "/v1/whoami": {"get": _op(
            "The caller: its token's name, access, projects and host permission",
            {"200": _json(WhoAmI, "The caller")}, op="getCaller")},
        "/v1/overview": {"get": _op(
            "Every model the caller may read: its rule, versions and their last seconds "
            "(requests/s, errors, latency, shadow agreement, replicas)",
            {"200": _json(Overview, "The models")}, (503,), op="getOverview")},
        "/metrics": {"get": _op(
            "The attached autoscaler's metrics",
            {"200": {"description": "Prometheus text format 0.0.4",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            op="getMetrics")},
        "/v1/routes": {"get": _op(
            "The route table gateways serve; with watch, a stream of tables",
            {"200": {"description": "The route table; with watch, one table per line as it "
                     "changes, and an empty line every 15 s while nothing does",
                     "content": {"application/json": {"schema": _ref(RouteTableSpec)},
                                 "application/x-ndjson": {"schema": {"type": "string"}}}}},
            op="getRouteTable", query=(watch, since))},
        "/v1/audit": {"get": _op(
            "Who changed what, oldest first",
            {"200": _json(AuditLog, "The most recent audit entries")}, (503,),
            op="listAuditEntries", query=(limit,))},
        "/v1/activations": {"post": _op(
            "A gateway holds requests for a version at zero: start it now",
            {"202": _json(ActivationAccepted, "Handed to the autoscaler")},
            (400, 404, 413, 503), ActivationBody, op="requestActivation")},
        BASE + "/versions": {"parameters": params, "get": _op(
            "List the model's version endpoints",
            {"200": _json(VersionEndpointList, "Version endpoints, terminated ones included")},
            op="listVersionEndpoints")},
        BASE + "/versions/{version}/endpoint": {
            "parameters": [*params, version],
            "put": _op("Deploy or redeploy a version endpoint",
                       {"202": {**_json(VersionEndpoint, "Accepted; the runtime starts it"),
                                "headers": ETAG}},
                       (400, 409, 412, 413, 503), VersionEndpointSpec,
                       op="deployVersionEndpoint", if_match=True, notes={403: (
                           "The token may not write this project, or lacks the host "
                           "permission (host: true) this spec needs: a command, a workdir, "
                           "a model_dir outside the --model-root directories, a pyfunc "
                           "module not in model_dir, or a reserved env_vars name (fields "
                           "name each; docs/security.md)")}),
            "get": _op("Read a version endpoint", version_ok, (404,), op="getVersionEndpoint"),
            "delete": _op("Undeploy a version endpoint", version_ok, (400, 404, 409, 412, 503),
                          op="undeployVersionEndpoint", if_match=True),
        },
        BASE + "/versions/{version}/logs": {"parameters": [*params, version], "get": _op(
            "A version endpoint's replica logs (local runtime); with follow, a text stream",
            {"200": {"description": "The last lines of each replica's log (newest files); with "
                     "follow, plain text under a '==> file <==' line per file, as written",
                     "content": {"application/json": {"schema": _ref(VersionLogs)},
                                 "text/plain": {"schema": {"type": "string"}}}}},
            (404, 409), op="getVersionEndpointLogs", query=(lines, follow))},
        BASE + "/endpoint": {
            "parameters": params,
            "put": _op("Create or change the model endpoint's rule",
                       {**endpoint_ok, "201": {**_json(ModelEndpoint, "Created"), "headers": ETAG}},
                       (400, 409, 412, 413, 503), ModelEndpointBody,
                       op="setModelEndpoint", if_match=True),
            "get": _op("Read the model endpoint", endpoint_ok, (404,), op="getModelEndpoint"),
            "delete": _op("Delete the model endpoint",
                          {"200": _json(EndpointDeleted, "Deleted")}, (400, 404, 409, 412, 503),
                          op="deleteModelEndpoint", if_match=True),
        },
        BASE + "/endpoint/history": {"parameters": params, "get": _op(
            "The model endpoint's last 100 rules",
            {"200": _json(RuleHistory, "Rules, oldest first")}, op="getModelEndpointHistory")},
        BASE + "/series": {"parameters": params, "get": _op(
            "The model's last 15 minutes per version and second, and the autoscaler's "
            "events; with watch, each new second as it closes",
            {"200": {"description": "The series; with watch, a stream of series holding only "
                     "what is new, one per line",
                     "content": {"application/json": {"schema": _ref(ModelSeries)},
                                 "application/x-ndjson": {"schema": {"type": "string"}}}}},
            (503,), op="getModelSeries", query=(since_second, series_watch))},
        BASE + "/endpoint:switch": {"parameters": params, "post": _op(
            "Blue-green: move all traffic to the other version", endpoint_ok,
            (400, 404, 409, 412, 413, 503), SwitchBody, body_required=False,
            op="switchModelEndpoint", if_match=True)},
        BASE + "/endpoint:rollback": {"parameters": params, "post": _op(
            "Return to the previous (or a named) rule", endpoint_ok,
            (400, 404, 409, 412, 413, 503), RollbackBody, body_required=False,
            op="rollbackModelEndpoint", if_match=True)},
        BASE + "/endpoint:rollout": {"parameters": params, "post": _op(
            "Start a rollout of a candidate version: shadow, canary steps, then the switch",
            {"201": {**_json(RolloutStatus, "Started: the first step is routed"),
                     "headers": ETAG}},
            (400, 404, 409, 412, 413, 503), RolloutPlan,
            op="startRollout", if_match=True, notes={409: (
                "A rollout is already running; the candidate is not running, has no ready "
                "replica or speaks another protocol; the rule splits traffic or mirrors "
                "already; or this controller reads no gateway signals")})},
        BASE + "/endpoint/rollout": {"parameters": params, "get": _op(
            "The model endpoint's rollout: phase, step, evidence and every decision",
            {"200": _json(RolloutStatus, "Running, or the last that ended")}, (404,),
            op="getRollout")},
        BASE + "/endpoint/rollout:pause": {"parameters": params, "post": _op(
            "Hold the rollout where it is (traffic stays; the analysis may still roll back)",
            {"200": _json(RolloutStatus, "Paused")}, (404, 409, 503), op="pauseRollout")},
        BASE + "/endpoint/rollout:resume": {"parameters": params, "post": _op(
            "Let a paused rollout go on", {"200": _json(RolloutStatus, "Resumed")},
            (404, 409, 503), op="resumeRollout")},
        BASE + "/endpoint/rollout:abort": {"parameters": params, "post": _op(
            "Stop the rollout and route as before it, in one revision",
            {"200": _json(RolloutStatus, "Aborted")}, (404, 409, 503), op="abortRollout")},
    }  # fmt: skip
    for path, item in paths.items():
        # Methods in the conventional order (get, put, post, delete), each operation in
        # one group by what it acts on; generated clients make a module per group.
        paths[path] = dict(sorted(item.items(), key=lambda kv: METHOD_ORDER.index(kv[0])))
        for method, op in paths[path].items():
            if method != "parameters":
                op["tags"] = [_tag(path)]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "merlin-dataplane controller",
            "version": "1",
            "description": "Deploy version endpoints, route model endpoints' traffic, and "
            "feed gateways their route tables. Errors are JSON: "
            '{"error": {"code", "message", "fields"}}.',
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        # OpenAPI's default, said explicitly: the controller that served this document.
        "servers": [{"url": "/", "description": "The controller that served this document"}],
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from --tokens; none needed "
                    "when the controller runs without tokens",
                }
            },
        },
        "security": [{"bearer": []}],
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
    }


def _tag(path: str) -> str:
    if path.startswith("/ui") or path in ("/v1/overview", "/v1/whoami") or path.endswith("/series"):
        return "Console"
    if "rollout" in path:
        return "Rollouts"
    if path.startswith(BASE + "/versions"):
        return "Version endpoints"
    if path.startswith(BASE + "/endpoint"):
        return "Model endpoints"
    if path in ("/v1/routes", "/v1/activations"):
        return "Gateways"
    return "Operations"


@cache
def query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """(path template, METHOD) → the query parameters the operation takes."""
    out: dict[tuple[str, str], frozenset[str]] = {}
    for path, item in openapi_document()["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
            out[(path, method.upper())] = frozenset(names)
    return out
