"""The routing rule of a model endpoint: one pydantic model shared by every edge.

The route file, the controller API and the Kubernetes CRD all describe a model
endpoint's rule with :class:`Rule`, so a rule that validates in one place validates
everywhere. Validation errors name the field and the reason; a rule is accepted whole
or rejected whole. The gateway never reads these models on the hot path: it compiles
them into the frozen snapshot in :mod:`merlin_dp.gateway.routing.table`.
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

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Destination(StrictModel):
    version: VersionId
    weight: int = Field(ge=0, le=100, description="Share of traffic in percent.")


HEADER_TOKEN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"  # RFC 9110 field-name


class HeaderMatch(StrictModel):
    """Send requests whose header matches to one version, before weights apply."""

    header: Annotated[str, StringConstraints(pattern=HEADER_TOKEN, max_length=128)]
    exact: str | None = Field(default=None, description="The header's whole value.")
    regex: str | None = Field(default=None, description="Searched in the header's value.")
    version: VersionId

    @model_validator(mode="after")
    def _one_test(self) -> HeaderMatch:
        if (self.exact is None) == (self.regex is None):
            raise ValueError("give exactly one of exact or regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        return self


class Sticky(StrictModel):
    """Pin each caller (by a header's or a cookie's value) to a version for a given split.

    Callers are placed on the weight space by a hash of their key, so when weights
    change only the callers in the share that moved change version.
    """

    header: Annotated[str, StringConstraints(pattern=HEADER_TOKEN, max_length=128)] | None = None
    cookie: Annotated[str, StringConstraints(pattern=HEADER_TOKEN, max_length=128)] | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Sticky:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("give exactly one of header or cookie")
        return self


class Mirror(StrictModel):
    """Copy a share of requests to a shadow version and compare its answers."""

    version: VersionId
    percent: float = Field(gt=0, le=100, description="Share of requests copied; may be 0.5.")
    relative_tolerance: float = Field(
        default=1e-6, ge=0, le=1, description="Numbers in JSON bodies equal within this."
    )


class Rule(StrictModel):
    """How a model endpoint's traffic is spread over its version endpoints."""

    destinations: list[Destination] = Field(
        min_length=1, description="Weighted versions; integer weights summing to 100."
    )
    match: list[HeaderMatch] = Field(
        default_factory=list, max_length=64, description="Evaluated in order, before weights."
    )
    sticky: Sticky | None = None
    mirror: Mirror | None = None
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

    def named_versions(self) -> list[tuple[str, str]]:
        """Every (field path, version) the rule names, for cross-checks."""
        named = [(f"destinations.{i}", d.version) for i, d in enumerate(self.destinations)]
        named += [(f"match.{i}", m.version) for i, m in enumerate(self.match)]
        if self.mirror is not None:
            named.append(("mirror", self.mirror.version))
        return named


def full_name(model: str, version: str) -> str:
    """Merlin's version endpoint name, `<model>-<version>`."""
    return f"{model}-{version}"
