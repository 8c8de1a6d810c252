"""What the SDK raises: one exception type per thing a caller handles differently.

API errors carry the answer's status, ``code``, ``message`` and ``fields`` (where in the
body or path each problem is); their ``str()`` is what the CLI prints:
``404 not_found: no version endpoint demo/iris/3``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class MerlinError(Exception):
    """Base of everything the SDK raises."""


@dataclass(frozen=True)
class FieldProblem:
    path: str  # a body field path (rule.destinations.0.weight), a parameter, or (body)
    message: str


class ApiError(MerlinError):
    """The controller refused the call."""

    def __init__(
        self, status: int, code: str, message: str, fields: list[FieldProblem] | None = None
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or []
        super().__init__(f"{status} {code}: {message}")


class Invalid(ApiError):
    """400, 413 or 422: the body, a path or a query parameter is wrong; ``fields`` says
    where."""


class Unauthorized(ApiError):
    """401: no token, or one the controller doesn't know."""


class Forbidden(ApiError):
    """403: the token may not do this (another project, read-only, or no host permission)."""


class NotFound(ApiError):
    """404: no such version endpoint, model endpoint, rollout or revision."""


class NoSuchModel(NotFound):
    """Neither a model endpoint nor any version endpoint has this name (the SDK's own
    conclusion from two 404s, so said without a status)."""

    def __init__(self, model: str) -> None:
        super().__init__(404, "not_found", f"no model endpoint or version endpoints for {model}")

    def __str__(self) -> str:
        return self.message


class Conflict(ApiError):
    """409: refused by the current state (e.g. a version that isn't running, a rollout
    already under way, a Kubernetes-managed endpoint)."""


class StaleRevision(ApiError):
    """412: the revision given as ``if_match`` is no longer current: someone else changed
    it since you read it. Read again and decide."""


class Unavailable(ApiError):
    """503: a dependency of the controller is down; nothing changed."""


BY_STATUS: dict[int, type[ApiError]] = {
    400: Invalid, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    412: StaleRevision, 413: Invalid, 422: Invalid, 503: Unavailable,
}  # fmt: skip


def api_error(status: int, body: Any, reason: str = "") -> ApiError:
    """The exception for an error answer: its documented JSON body, or what arrived."""
    cls = BY_STATUS.get(status, ApiError)
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        fields = [
            FieldProblem(str(f.get("path", "")), str(f.get("message", "")))
            for f in err.get("fields") or []
            if isinstance(f, dict)
        ]
        return cls(status, str(err.get("code", "error")), err["message"], fields)
    return cls(status, "error", reason or f"HTTP {status}")


class Unreachable(MerlinError):
    """The controller or the gateway did not answer (not running, wrong address)."""


class DeployFailed(MerlinError):
    """The version endpoint failed to start. ``reason`` is the controller's message (its
    first line says why; a crash quotes the replica's last lines), ``logs`` the replicas'
    last log lines, ``version`` the endpoint as the controller reports it."""

    def __init__(self, name: str, reason: str, logs: list[str], version: Any) -> None:
        self.name = name
        self.reason = reason
        self.logs = logs
        self.version = version
        first, *rest = reason.splitlines() or ["failed"]
        if not rest and logs:
            rest = ["last log lines:", *logs]
        super().__init__(f"{name} failed: {first}" + "".join(f"\n    {line}" for line in rest))


class WaitTimeout(MerlinError):
    """A wait ran out: the version endpoint is still pending (no replica ready yet)."""

    def __init__(self, name: str, seconds: float, version: Any) -> None:
        self.name = name
        self.version = version
        super().__init__(
            f"{name} is still pending after {seconds:g} s: no replica has passed its "
            "readiness check yet"
        )


class PackagingError(MerlinError):
    """A model object can't be packaged into a directory a replica can load; the message
    says what and what to do."""


class PredictionFailed(MerlinError):
    """The gateway or the model answered a prediction with an error status."""

    def __init__(self, status: int, body: Any, version: str) -> None:
        self.status = status
        self.body = body
        self.version = version
        served = f" (version {version})" if version else ""
        super().__init__(f"prediction answered {status}{served}: {body}")
