"""The routing rule of a model endpoint: one pydantic model shared by every edge.

The route file, the controller API and the Kubernetes CRD all describe a model
endpoint's rule with :class:`Rule`, so a rule that validates in one place validates
everywhere. Validation errors name the field and the reason; a rule is accepted whole
or rejected whole. The gateway never reads these models on the hot path: it compiles
them into the frozen snapshot in :mod:`gateway.table`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# Merlin's names: lowercase alphanumerics and dashes, starting and ending alphanumeric.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
VERSION_PATTERN = r"^[a-z0-9]([a-z0-9.]*[a-z0-9])?$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
VersionId = Annotated[str, StringConstraints(pattern=VERSION_PATTERN, max_length=32)]
Protocol = Literal["HTTP_JSON", "UPI_V1"]


class StrictModel(BaseModel):
    """Base for edge models: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Destination(StrictModel):
    version: VersionId
    weight: int = Field(ge=0, le=100, description="Share of traffic in percent.")


class Rule(StrictModel):
    """How a model endpoint's traffic is spread over its version endpoints."""

    destinations: list[Destination] = Field(
        min_length=1, description="Weighted versions; integer weights summing to 100."
    )
    timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Longest a replica may stay silent: before its answer starts, and "
        "between reads of a streamed body (nginx's proxy_read_timeout).",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Further attempts on another replica after a failed connect.",
    )
    idempotent: bool = Field(
        default=False,
        description="Requests may be replayed on another replica even after their body "
        "reached an upstream (only buffered bodies can be replayed).",
    )

    @model_validator(mode="after")
    def _weights_are_a_split(self) -> Rule:
        seen: set[str] = set()
        for d in self.destinations:
            if d.version in seen:
                raise ValueError(f"destinations: version {d.version!r} appears more than once")
            seen.add(d.version)
        total = sum(d.weight for d in self.destinations)
        if total != 100:
            raise ValueError(f"destinations: weights must sum to 100, got {total}")
        return self

    def routed_versions(self) -> list[str]:
        """Versions that can receive traffic under this rule (weight above zero)."""
        return [d.version for d in self.destinations if d.weight > 0]


def full_name(model: str, version: str) -> str:
    """Merlin's version endpoint name, `<model>-<version>`."""
    return f"{model}-{version}"


def is_name(value: str) -> bool:
    return re.fullmatch(NAME_PATTERN, value) is not None
