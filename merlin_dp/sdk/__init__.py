"""The Python SDK: deploy, route and watch models from a notebook or a service.

    from merlin_dp.sdk import Client, PyFuncModel

    class Echo(PyFuncModel):
        def infer(self, request, **kwargs):
            return {"echo": request}

    client = Client()                                   # the controller of `merlin-dp up`
    client.deploy("demo/echo/1", model=Echo())          # packaged, started, waited for
    client.route("demo/echo", {"1": 100})
    client.predict("demo/echo", {"x": 1}).result

:class:`Client` blocks; :class:`AsyncClient` has the same methods, awaited. Bodies and
answers are the API's own pydantic models; refusals raise the types in
:mod:`merlin_dp.sdk.errors`. docs/sdk.md has the tour.
"""

from merlin_dp.controller.models import (
    ModelEndpoint,
    RuleRevision,
    VersionEndpoint,
    VersionLogs,
)
from merlin_dp.sdk.client import AsyncClient, Client
from merlin_dp.sdk.errors import (
    ApiError,
    Conflict,
    DeployFailed,
    FieldProblem,
    Forbidden,
    Invalid,
    MerlinError,
    NotFound,
    PackagingError,
    PredictionFailed,
    StaleRevision,
    Unauthorized,
    Unavailable,
    Unreachable,
    WaitTimeout,
)
from merlin_dp.sdk.operations import ModelStatus, Prediction, RouteChange
from merlin_dp.sdk.packaging import Package, package
from merlin_dp.servers.merlin_contract import PyFuncModel
from merlin_dp.spec.endpoints import AutoscalingPolicy, ResourceRequest, VersionEndpointSpec
from merlin_dp.spec.rollout import RolloutPlan, RolloutStatus
from merlin_dp.spec.rule import Destination, HeaderMatch, Mirror, Rule, Sticky

__all__ = [
    "ApiError", "AsyncClient", "AutoscalingPolicy", "Client", "Conflict", "DeployFailed",
    "Destination", "FieldProblem", "Forbidden", "HeaderMatch", "Invalid", "MerlinError",
    "Mirror", "ModelEndpoint", "ModelStatus", "NotFound", "Package", "PackagingError",
    "Prediction", "PredictionFailed", "PyFuncModel", "ResourceRequest", "RolloutPlan",
    "RolloutStatus", "RouteChange", "Rule", "RuleRevision", "StaleRevision", "Sticky",
    "Unauthorized", "Unavailable", "Unreachable", "VersionEndpoint", "VersionEndpointSpec",
    "VersionLogs", "WaitTimeout", "package",
]  # fmt: skip
