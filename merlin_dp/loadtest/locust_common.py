"""What the Locust suites and ``merlin-dp loadtest`` share.

The suites (``locust_model.py``, ``locust_version.py``, ``locust_upi.py`` beside it) import
this module; ``merlin-dp loadtest`` imports it too, to build Locust's command line and to turn
its CSV files into a one-screen summary. It never imports Locust itself: Locust patches
the standard library with gevent when imported, which must not happen inside
``merlin-dp`` or a test run. The suites hand it Locust's objects duck-typed.

Per-version reporting: every request is named ``<kind> v<version>`` after its answer
arrives, from the ``X-Model-Version`` header the gateway sets on every answer (errors
included), so Locust's own tables show the split callers actually saw. A failure is
named by its cause (``HTTP 502 bad_gateway``, ``connection ConnectionRefusedError``) so
Locust's failure table reads as errors by kind.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from merlin_dp.protos.caraml.upi.v1 import table_pb2, type_pb2, upi_pb2

VERSION_HEADER = "X-Model-Version"
DEFAULT_PAYLOAD = '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
NO_VERSION = "-"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --- what to load --------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One model behind the gateway, and the versions to call directly."""

    project: str
    model: str
    domain: str = "localhost"
    versions: tuple[str, ...] = ()
    payload: str = DEFAULT_PAYLOAD

    @property
    def model_host(self) -> str:
        """The model endpoint's Host: ``<model>.<project>.<domain>``."""
        return f"{self.model}.{self.project}.{self.domain}"

    def version_host(self, version: str) -> str:
        """A version endpoint's Host: ``<model>-<version>.<project>.<domain>``."""
        return f"{self.model}-{version}.{self.project}.{self.domain}"

    def version_path(self, version: str) -> str:
        return f"/v1/models/{self.model}-{version}:predict"

    @classmethod
    def from_options(cls, options: Any) -> Target:
        """From Locust's parsed options (the arguments :func:`add_suite_arguments` adds)."""
        project, model = parse_model(str(options.model))
        versions = tuple(v.strip() for v in str(options.versions or "").split(",") if v.strip())
        return cls(project, model, str(options.domain), versions, str(options.payload))


def parse_model(text: str) -> tuple[str, str]:
    """``PROJECT/MODEL`` → (project, model); ValueError with the reason otherwise."""
    parts = text.split("/")
    if len(parts) != 2 or not all(NAME_RE.match(p) for p in parts):
        raise ValueError(f"{text!r} is not PROJECT/MODEL (lowercase letters, digits, dashes)")
    return parts[0], parts[1]


def add_suite_arguments(parser: Any) -> None:
    """The suites' own options, added to Locust's parser (``init_command_line_parser``).

    Each can also be set as an environment variable (``LOCUST_MODEL`` …), as Locust
    allows for every option."""
    parser.add_argument("--model", default="demo/iris", env_var="LOCUST_MODEL",
                        help="PROJECT/MODEL to load (its stable URL)")  # fmt: skip
    parser.add_argument("--versions", default="", env_var="LOCUST_VERSIONS",
                        help="version endpoints to call directly, comma-separated "
                        "(locust_version.py)")  # fmt: skip
    parser.add_argument("--domain", default="localhost", env_var="LOCUST_DOMAIN",
                        help="domain of model URLs: <model>.<project>.<domain>")  # fmt: skip
    parser.add_argument("--payload", default=DEFAULT_PAYLOAD, env_var="LOCUST_PAYLOAD",
                        help="JSON request body")  # fmt: skip


def request_from_payload(payload: str) -> upi_pb2.PredictValuesRequest:
    """``{"instances": [[5.1, 3.5], …]}`` → a table of DOUBLE columns f0…, a row each."""
    instances = json.loads(payload).get("instances") or [[0.0]]
    width = max(len(row) for row in instances)
    columns = [table_pb2.Column(name=f"f{i}", type=type_pb2.TYPE_DOUBLE) for i in range(width)]
    rows = [
        table_pb2.Row(
            row_id=str(n),
            values=[table_pb2.Value(double_value=float(v)) for v in row]
            + [table_pb2.Value(is_null=True)] * (width - len(row)),
        )
        for n, row in enumerate(instances)
    ]
    return upi_pb2.PredictValuesRequest(
        prediction_table=table_pb2.Table(name="locust", columns=columns, rows=rows)
    )


# --- naming each answer ----------------------------------------------------------------


class CaughtResponse(Protocol):
    """What the suites get from ``client.post(..., catch_response=True)`` (Locust's
    ``ResponseContextManager``, for HttpUser and FastHttpUser alike)."""

    status_code: int
    request_meta: dict[str, Any]

    @property
    def headers(self) -> Any: ...

    @property
    def content(self) -> bytes | None: ...

    def success(self) -> None: ...

    def failure(self, exc: Any) -> None: ...


def request_name(kind: str, version: str | None) -> str:
    return f"{kind} v{version or NO_VERSION}"


def failure_reason(status: int, body: bytes | None, error: BaseException | None = None) -> str:
    """Why a request failed, as one short kind: ``HTTP 502 bad_gateway`` (the gateway's
    JSON error code when it sent one), ``connection ConnectionResetError``, …; "" if it
    did not fail."""
    if error is not None and not status:
        return f"connection {type(error).__name__}"
    if 200 <= status < 300:
        return ""
    code = ""
    try:
        parsed = json.loads(body or b"")
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            code = str(parsed["error"].get("code", ""))
    except ValueError:
        pass
    return f"HTTP {status} {code}".rstrip()


def report(response: CaughtResponse, kind: str) -> None:
    """Name the request by the version that answered and mark success or its failure."""
    headers = response.headers
    version = headers.get(VERSION_HEADER) if headers is not None else None
    response.request_meta["name"] = request_name(kind, version)
    error = getattr(response, "error", None)
    try:
        body = response.content
    except Exception:  # a failed exchange may have no body to read
        body = None
    reason = failure_reason(response.status_code or 0, body, error)
    if reason:
        response.failure(reason)
    else:
        response.success()


# --- the summary of a run ----------------------------------------------------------------


@dataclass
class Summary:
    """One screen about a Locust run, from its CSV files."""

    requests: int = 0
    failures: int = 0
    requests_per_second: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # kind → occurrences
    answered_by: dict[str, int] = field(default_factory=dict)  # version → successful answers

    def shares(self) -> dict[str, float]:
        total = sum(self.answered_by.values())
        return {v: n / total for v, n in sorted(self.answered_by.items())} if total else {}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shares": self.shares()}


_CATCH_WRAPPER = re.compile(r"^(?:CatchResponseError|UpiFailure)\((['\"])(.*)\1\)$")


def error_kind(text: str) -> str:
    """Locust's failure text without its exception wrapper."""
    match = _CATCH_WRAPPER.match(text.strip())
    return match.group(2) if match else text.strip()


def _number(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:  # "N/A" before any request
        return 0.0


def read_summary(csv_prefix: Path) -> Summary:
    """Summarise ``<prefix>_stats.csv`` and ``<prefix>_failures.csv`` (Locust ``--csv``)."""
    summary = Summary()
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row.get("Name", "")
            if name == "Aggregated":
                summary.requests = int(_number(row.get("Request Count")))
                summary.failures = int(_number(row.get("Failure Count")))
                summary.requests_per_second = _number(row.get("Requests/s"))
                summary.p50_ms = _number(row.get("50%"))
                summary.p95_ms = _number(row.get("95%"))
                summary.p99_ms = _number(row.get("99%"))
                continue
            _, _, tag = name.rpartition(" v")
            ok = int(_number(row.get("Request Count"))) - int(_number(row.get("Failure Count")))
            if tag and ok > 0:
                summary.answered_by[tag] = summary.answered_by.get(tag, 0) + ok
    failures = Path(f"{csv_prefix}_failures.csv")
    if failures.exists():
        with failures.open(newline="") as f:
            for row in csv.DictReader(f):
                kind = error_kind(row.get("Error", ""))
                summary.errors[kind] = summary.errors.get(kind, 0) + int(
                    _number(row.get("Occurrences"))
                )
    return summary


def format_summary(summary: Summary, title: str, files: Sequence[Path] = ()) -> str:
    """The one-screen summary ``merlin-dp loadtest`` prints."""
    lines = [
        title,
        f"  requests     {summary.requests}  ({summary.failures} failed)",
        f"  requests/s   {summary.requests_per_second:.1f}",
        f"  latency      p50 {summary.p50_ms:.0f} ms   p95 {summary.p95_ms:.0f} ms   "
        f"p99 {summary.p99_ms:.0f} ms",
    ]
    shares = summary.shares()
    if shares:
        split = "   ".join(
            f"v{v} {share:.1%} ({summary.answered_by[v]})" for v, share in shares.items()
        )
        lines.append(f"  answered by  {split}")
    else:
        lines.append("  answered by  (no successful answer)")
    if summary.errors:
        lines.append("  errors by kind")
        for kind, n in sorted(summary.errors.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {n:>8}  {kind}")
    else:
        lines.append("  errors       none")
    for path in files:
        lines.append(f"  wrote        {path}")
    return "\n".join(lines)


def write_summary_json(summary: Summary, path: Path, extra: Mapping[str, Any]) -> None:
    path.write_text(json.dumps({**extra, **summary.to_json()}, indent=2) + "\n")
