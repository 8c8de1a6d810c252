"""The endpoint specs: how to run a version endpoint, and a model endpoint's routing.

:class:`VersionEndpointSpec` is the body of a deploy (``PUT .../versions/{v}/endpoint``):
what runs, its resources and its autoscaling policy. :class:`ModelEndpointSpec` is one
model's stable URL and its rule: the spec of a ``ModelEndpoint`` object in Kubernetes and
an entry of every route table. Each is the one class for its concept; the controller
stores them, the gateway routes by the second, the autoscaler reads the policy.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from merlin_dp.spec.rule import Name, Protocol, Rule, StrictModel

MetricsType = Literal["cpu_utilization", "memory_utilization", "rps", "concurrency"]
ModelType = Literal["custom", "pyfunc", "sklearn", "kubernetes"]

# Requests one replica of a version serves at once when its deploy body does not say
# (Knative's containerConcurrency; 0 there means no limit). The shipped servers run a
# synchronous predict on a pool of threads at least this large, or an async one in their
# event loop, so four in flight is within what each can do; a custom server declares its
# own. Past the limit, requests wait in the gateway, where the autoscaler sees them.
DEFAULT_CONTAINER_CONCURRENCY = 4

CPU = r"^([0-9]+m|[0-9]+(\.[0-9]+)?)$"
MEMORY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class ResourceRequest(StrictModel):
    min_replica: int = Field(default=1, ge=0, le=100)
    max_replica: int = Field(default=2, ge=1, le=100)
    cpu_request: Annotated[str, StringConstraints(pattern=CPU)] = "500m"
    memory_request: Annotated[str, StringConstraints(pattern=MEMORY)] = "512Mi"

    @model_validator(mode="after")
    def _bounds(self) -> ResourceRequest:
        if self.min_replica > self.max_replica:
            raise ValueError(
                f"min_replica ({self.min_replica}) is above max_replica ({self.max_replica})"
            )
        return self


class AutoscalingPolicy(StrictModel):
    """Merlin's policy. Utilization targets are percent of the request (1-100); rps and
    concurrency targets are per replica."""

    metrics_type: MetricsType = "concurrency"
    target_value: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _range(self) -> AutoscalingPolicy:
        if self.metrics_type.endswith("_utilization") and self.target_value > 100:
            raise ValueError(f"{self.metrics_type} target_value is a percentage (1-100)")
        return self


class VersionEndpointSpec(StrictModel):
    """How to run one version endpoint (the body of PUT .../versions/{v}/endpoint)."""

    type: ModelType = Field(
        default="custom",
        description="custom, pyfunc or sklearn. kubernetes: a Deployment and Service found "
        "in the cluster (Kubernetes mode); shown, never accepted by the API.",
    )
    command: list[str] = Field(
        default_factory=list, description="custom: the program and its arguments."
    )
    model_dir: str = Field(default="", description="pyfunc / sklearn: the artifact directory.")
    pyfunc_class: str = Field(
        default="",
        description="pyfunc: 'module:Class' in model_dir. Empty: model_dir is a package the "
        "SDK made (its merlin-dp-model.json names the model).",
    )
    protocol: Protocol = "HTTP_JSON"
    resource_request: ResourceRequest = Field(default_factory=ResourceRequest)
    autoscaling_policy: AutoscalingPolicy = Field(default_factory=AutoscalingPolicy)
    env_vars: dict[str, str] = Field(default_factory=dict)
    container_concurrency: int | None = Field(
        default=None, ge=0, le=1000,
        description="Requests one replica serves at once (Knative's containerConcurrency): "
        "the gateway never sends a replica more, and holds the rest in a bounded queue per "
        "version. 0: no limit (the replica queues what it can't serve, where no one can see "
        f"it). Omitted: {DEFAULT_CONTAINER_CONCURRENCY}.",
    )  # fmt: skip
    ready_deadline_seconds: float = Field(
        default=120.0, gt=0, le=3600,
        description="Fails the version if no replica is ready by then (a crash loop fails "
        "it sooner).",
    )  # fmt: skip
    workdir: str = Field(
        default="", max_length=4096,
        description="custom: the absolute directory the command runs in, so relative paths "
        "in it mean what they meant where it was deployed from (merlin-dp deploy sends the "
        "caller's current directory). Empty: the controller's working directory.",
    )  # fmt: skip

    @property
    def concurrency_limit(self) -> int:
        """The per-replica limit in force: declared, or the documented default."""
        if self.container_concurrency is None:
            return DEFAULT_CONTAINER_CONCURRENCY
        return self.container_concurrency

    @field_validator("env_vars")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name.startswith("CARAML_") or name == "STORAGE_URI":
                raise ValueError(f"{name} is set by the platform (replica contract)")
        return value

    @model_validator(mode="after")
    def _runnable(self) -> VersionEndpointSpec:
        if self.type == "custom" and not self.command:
            raise ValueError("type custom needs a command")
        if self.type in ("pyfunc", "sklearn") and not self.model_dir:
            raise ValueError(f"type {self.type} needs model_dir")
        if self.type == "pyfunc" and self.pyfunc_class and ":" not in self.pyfunc_class:
            raise ValueError("pyfunc_class is 'module:Class' (or empty for a packaged model)")
        if self.type == "pyfunc" and not self.pyfunc_class and self.protocol == "UPI_V1":
            raise ValueError("type pyfunc with UPI_V1 needs pyfunc_class as 'module:Class'")
        if self.type == "sklearn" and self.protocol == "UPI_V1":
            raise ValueError("type sklearn serves HTTP_JSON; for UPI_V1 wrap it as pyfunc")
        if self.workdir and self.type != "custom":
            raise ValueError(f"workdir is for type custom; type {self.type} reads model_dir")
        if self.workdir and not self.workdir.startswith("/"):
            raise ValueError(f"workdir must be an absolute path, not {self.workdir!r}")
        return self


class ModelEndpointSpec(StrictModel):
    """The spec of a ModelEndpoint: which model's stable URL, and its routing rule."""

    project: Name = Field(description="The project (Merlin's namespace of models).")
    model: Name = Field(description="The model; one ModelEndpoint per project and model.")
    protocol: Protocol = Field(
        default="HTTP_JSON", description="HTTP_JSON or UPI_V1; every destination must match."
    )
    rule: Rule = Field(description="How traffic is spread over the model's version endpoints.")
