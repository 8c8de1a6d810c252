"""The OpenAPI 3.1 document, generated from the API's pydantic models.

Schemas come from the models themselves (``pydantic.json_schema.models_json_schema``),
so the document can't drift from what the API validates; the paths list the operations
with their parameters, bodies and error answers.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from controller.models import (
    ActivationBody,
    ErrorResponse,
    ModelEndpoint,
    ModelEndpointBody,
    RollbackBody,
    SwitchBody,
    VersionEndpoint,
    VersionEndpointSpec,
)
from gateway.routes import RouteTableSpec
from gateway.rule import NAME_PATTERN, VERSION_PATTERN

REF = "#/components/schemas/{model}"
MODELS: list[type[BaseModel]] = [
    ActivationBody, ErrorResponse, ModelEndpoint, ModelEndpointBody, RollbackBody, SwitchBody,
    VersionEndpoint, VersionEndpointSpec, RouteTableSpec,
]  # fmt: skip


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    schema = _ref(model) if isinstance(model, type) else model
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON or header", 401: "Missing or unknown token",
        403: "Token not allowed here", 404: "Unknown project, model or version",
        409: "Refused by the current state", 412: "Stale If-Match revision",
        413: "Body too large", 422: "Invalid body, with field paths",
        503: "No autoscaler attached",
    }  # fmt: skip
    return {str(c): {"description": text[c], **_json(ErrorResponse)} for c in codes}


def _op(summary: str, ok: dict[str, Any], errors: tuple[int, ...], body: type[BaseModel] | None = None,
        body_required: bool = True, if_match: bool = False) -> dict[str, Any]:  # fmt: skip
    op: dict[str, Any] = {"summary": summary, "responses": {**ok, **_errors(401, 403, *errors)}}
    if body is not None:
        op["requestBody"] = {"required": body_required, **_json(body)}
    if if_match:
        op["parameters"] = [{"name": "If-Match", "in": "header", "required": False,
                             "schema": {"type": "string", "pattern": r'^"?[0-9]+"?$'},
                             "description": "The revision you read (ETag); 412 if stale."}]  # fmt: skip
    return op


@cache
def openapi_document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    name = {"type": "string", "pattern": NAME_PATTERN, "maxLength": 63}
    params = [
        {"name": "project", "in": "path", "required": True, "schema": name},
        {"name": "model", "in": "path", "required": True, "schema": name},
    ]
    version_param = {"name": "version", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": VERSION_PATTERN, "maxLength": 32}}  # fmt: skip
    base = "/v1/projects/{project}/models/{model}"
    version_ok = {"200": {"description": "The version endpoint", **_json(VersionEndpoint)}}
    endpoint_ok = {"200": {"description": "The model endpoint", **_json(ModelEndpoint)}}
    paths: dict[str, Any] = {
        "/v1/routes": {"get": {
            "summary": "The route table; with watch=1 a stream of tables (NDJSON)",
            "parameters": [
                {"name": "watch", "in": "query", "schema": {"type": "string", "enum": ["0", "1"]}},
                {"name": "since", "in": "query", "schema": {"type": "integer"}},
            ],
            "responses": {"200": {"description": "Route table", **_json(RouteTableSpec)},
                          **_errors(401, 403, 422)},
        }},
        base + "/versions": {"parameters": params, "get": _op(
            "List the model's version endpoints",
            {"200": {"description": "Version endpoints", **_json({"type": "object"})}}, (404, 422))},
        base + "/versions/{version}/endpoint": {
            "parameters": [*params, version_param],
            "put": _op("Deploy or redeploy a version endpoint",
                       {"202": {"description": "Accepted; status pending", **_json(VersionEndpoint)}},
                       (400, 409, 412, 413, 422), VersionEndpointSpec, if_match=True),
            "get": _op("Read a version endpoint", version_ok, (404, 422)),
            "delete": _op("Undeploy a version endpoint", version_ok, (404, 409, 412, 422),
                          if_match=True),
        },
        base + "/endpoint": {
            "parameters": params,
            "put": _op("Create or change the model endpoint's rule",
                       {**endpoint_ok, "201": {"description": "Created", **_json(ModelEndpoint)}},
                       (400, 409, 412, 413, 422), ModelEndpointBody, if_match=True),
            "get": _op("Read the model endpoint", endpoint_ok, (404, 422)),
            "delete": _op("Delete the model endpoint", {"200": {"description": "Deleted"}},
                          (404, 412, 422), if_match=True),
        },
        base + "/endpoint/history": {"parameters": params, "get": _op(
            "The last 100 rules", {"200": {"description": "History", **_json({"type": "object"})}},
            (422,))},
        base + "/endpoint:switch": {"parameters": params, "post": _op(
            "Blue-green: move all traffic to the other version", endpoint_ok,
            (400, 404, 409, 412, 413, 422), SwitchBody, body_required=False, if_match=True)},
        base + "/endpoint:rollback": {"parameters": params, "post": _op(
            "Return to the previous (or a named) rule", endpoint_ok,
            (400, 404, 409, 412, 413, 422), RollbackBody, body_required=False, if_match=True)},
        "/v1/activations": {"post": _op(
            "A gateway holds requests for a version at zero: start it now",
            {"202": {"description": "Handed to the autoscaler", **_json({"type": "object"})}},
            (400, 404, 413, 422, 503), ActivationBody)},
        "/metrics": {"get": {
            "summary": "The attached autoscaler's metrics (Prometheus text)",
            "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(401, 403)},
        }},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "merlin-dataplane controller", "version": "1"},
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
