"""The controller's /openapi.json is whole, and the API keeps to it.

Checked on the live document of a running controller: every ``$ref`` resolves, component
names are the models' own, every operation has a unique operationId, every served route
is documented; Redocly CLI lints it clean (rules in redocly.yaml) and
openapi-python-client generates a whole client from it, which then deploys a version
endpoint and routes to it. And the edges the document describes: 405 with ``Allow``,
401 with ``WWW-Authenticate``, query parameters and body enums validated, error messages
free of Python's reprs.

Redocly CLI is installed by the test (npm ci from requirements/npm/ into .cache/npm/, under
a file lock); openapi-python-client comes with the ``dev`` extra. Neither is ever skipped.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import http.client
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from merlin_dp.controller.openapi import openapi_document
from merlin_dp.controller.server import ControllerConfig, start_controller
from tests.conftest import ROOT, running_controller

TOKEN = "openapi-document-tests"
EXAMPLE = [sys.executable, str(ROOT / "examples" / "custom_model.py")]
NPM_REQUIREMENTS = ROOT / "requirements" / "npm"
CACHE = ROOT / ".cache"
NO_BODY: Any = object()
METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS")
# Values for path parameters when a test calls every path.
PATH_VALUES = {"project": "docs", "model": "scorer", "version": "1", "path": "index.html"}
BASE = "/v1/projects/{project}/models/{model}"


# --- a running controller and plain HTTP to it --------------------------------------------


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tokens = (f"tokens:\n  - {{name: tests, token: {TOKEN}, access: write, projects: ['*'],"
              " host: true}\n")  # fmt: skip
    with running_controller(tmp_path_factory.mktemp("controller"), tokens) as api:
        yield api


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def error(self) -> dict[str, Any]:
        assert self.status >= 400 and isinstance(self.body, dict), (self.status, self.body)
        err: dict[str, Any] = self.body["error"]
        assert set(err) == {"code", "message", "fields"}, err
        return err

    def __repr__(self) -> str:
        return f"{self.status} {self.body!r}"


def call(
    base: str,
    method: str,
    path: str,
    body: Any = NO_BODY,
    *,
    read_body: bool = True,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One request on its own connection; the body is parsed as JSON when it is JSON."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        send = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
        data: bytes | None = None
        if isinstance(body, bytes):
            data = body
        elif body is not NO_BODY:
            data = json.dumps(body).encode()
            send["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=send)
        resp = conn.getresponse()
        if not read_body:
            return Answer(resp.status, resp.headers, None)
        raw = resp.read()
        parsed: Any = raw.decode(errors="replace")
        if resp.headers.get_content_type() == "application/json":
            parsed = json.loads(raw)
        return Answer(resp.status, resp.headers, parsed)
    finally:
        conn.close()


def live_document(base: str) -> dict[str, Any]:
    answer = call(base, "GET", "/openapi.json", headers={"Authorization": ""})
    assert answer.status == 200, answer
    doc: dict[str, Any] = answer.body
    return doc


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                yield path, method.upper(), op


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)], path)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only local references are expected"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve (at {part!r})"
        node = node[part]
    return node


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


# --- the document itself ---------------------------------------------------------------------


def test_every_ref_in_the_live_document_resolves(controller: str) -> None:
    doc = live_document(controller)
    found = list(refs(doc))
    assert found, "a document without references checks nothing"
    for ref in found:
        target = resolve(doc, ref)
        assert isinstance(target, dict) and target, ref
    # The deploy body is the controller's own spec; a route table lists the table's entries.
    deploy = doc["paths"][BASE + "/versions/{version}/endpoint"]
    body = deploy["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/VersionEndpointSpec"}
    table = doc["components"]["schemas"]["RouteTableSpec"]["properties"]
    assert table["version_endpoints"]["items"] == {
        "$ref": "#/components/schemas/RouteTableVersionEndpoint"
    }


def test_component_names_are_stable_and_unique(controller: str) -> None:
    schemas = live_document(controller)["components"]["schemas"]
    for name, schema in schemas.items():
        # A module-qualified name (controller__models__X) is pydantic resolving a clash:
        # such names change whenever the clash does.
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", name), name
        # Generators name classes after titles: two equal titles are two equal classes.
        assert schema["title"] == name
    assert "VersionEndpointSpec" in schemas and "RouteTableVersionEndpoint" in schemas
    spec, entry = schemas["VersionEndpointSpec"], schemas["RouteTableVersionEndpoint"]
    assert "command" in spec["properties"] and "replicas" in entry["properties"]


def test_every_operation_has_a_unique_operation_id(controller: str) -> None:
    doc = live_document(controller)
    ids = []
    for path, method, op in operations(doc):
        op_id = op.get("operationId")
        assert op_id, f"{method} {path} has no operationId"
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]+", op_id), f"{op_id}: not camelCase"
        ids.append(op_id)
    assert len(ids) == len(set(ids)), sorted(ids)
    # What probes, Prometheus and people look for first must be there too.
    documented = {(path, method) for path, method, _ in operations(doc)}
    for path in ("/v1/audit", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (path, "GET") in documented, path


async def test_every_served_route_is_documented(tmp_path: Path) -> None:
    controller, runner, _ = await start_controller(
        ControllerConfig(state_dir=tmp_path / "s", port=0, runtime="none")
    )
    try:
        served = {
            (route.resource.canonical, route.method)
            for route in runner.app.router.routes()
            if route.resource is not None and route.method != "HEAD"  # HEAD rides on GET
        }
    finally:
        await runner.cleanup()
        await controller.close()
    documented = {(path, method) for path, method, _ in operations(openapi_document())}
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


# --- a real linter and a real generator --------------------------------------------------------


def redocly_cli() -> Path:
    """Redocly CLI at the version requirements/npm/ locks, installed into .cache/npm/.

    Installed on first use and again whenever the lock file changes; a file lock keeps
    parallel test runs from installing over each other."""
    target = CACHE / "npm"
    cli = target / "node_modules" / "@redocly" / "cli" / "bin" / "cli.js"
    stamp = target / "installed.sha256"
    files = [NPM_REQUIREMENTS / "package.json", NPM_REQUIREMENTS / "package-lock.json"]
    wanted = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    target.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "npm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cli.is_file() and stamp.is_file() and stamp.read_text() == wanted:
            return cli
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is needed to install Redocly CLI (node 20.19+ or 22.12+)")
        stamp.unlink(missing_ok=True)
        for f in files:
            shutil.copy(f, target / f.name)
        # npm ci: exactly the lock file's versions and hashes, or an error.
        result = subprocess.run(
            [npm, "ci", "--prefix", str(target), "--ignore-scripts", "--no-audit", "--no-fund"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if result.returncode != 0 or not cli.is_file():
            pytest.fail(f"npm ci of requirements/npm failed:\n{result.stdout}\n{result.stderr}")
        stamp.write_text(wanted)
    return cli


def test_redocly_lints_the_live_document_clean(controller: str, tmp_path: Path) -> None:
    cli = redocly_cli()
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(live_document(controller), indent=1))
    node = shutil.which("node") or "node"
    # No telemetry or update check: tests reach nothing but this machine.
    env = {**os.environ, "REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true",
           "NO_COLOR": "1"}  # fmt: skip
    result = subprocess.run(
        [node, str(cli), "lint", "--config", str(ROOT / "redocly.yaml"), "--format", "stylish",
         "--max-problems", "1000", str(document)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "valid" in output and " error " not in output and " warning " not in output, output


def generate_client(doc: dict[str, Any], into: Path) -> Path:
    tool = shutil.which("openapi-python-client") or str(
        Path(sys.executable).parent / "openapi-python-client"
    )
    if not Path(tool).exists():
        pytest.fail("openapi-python-client is missing: pip install -e '.[dev]'")
    (into / "openapi.json").write_text(json.dumps(doc))
    # No post hooks: the generated code is imported, not committed, so it needn't be formatted.
    (into / "config.yaml").write_text("post_hooks: []\n")
    package = into / "merlin_dp_client"
    result = subprocess.run(
        [tool, "generate", "--path", str(into / "openapi.json"), "--config",
         str(into / "config.yaml"), "--meta", "none", "--output-path", str(package),
         "--fail-on-warning"],
        capture_output=True, text=True, timeout=300, cwd=into,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Warning" not in output and "will not be generated" not in output, output
    return package


def test_a_generated_client_deploys_and_routes(controller: str, tmp_path: Path) -> None:
    package = generate_client(live_document(controller), tmp_path)
    generated = {p.stem for p in package.glob("api/*/*.py")} - {"__init__"}
    doc_ids = {op["operationId"] for _, _, op in operations(live_document(controller))}
    assert generated == {re.sub(r"(?<!^)(?=[A-Z])", "_", i).lower() for i in doc_ids}

    sys.path.insert(0, str(tmp_path))
    try:
        _use_generated_client(controller)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n.split(".")[0] == "merlin_dp_client"]:
            del sys.modules[name]


def _use_generated_client(base: str) -> None:
    def load(name: str) -> Any:
        return importlib.import_module(f"merlin_dp_client.{name}")

    client = load("client").AuthenticatedClient(base_url=base, token=TOKEN)
    models = load("models")
    deploy = load("api.version_endpoints.deploy_version_endpoint")
    get_version = load("api.version_endpoints.get_version_endpoint")
    list_versions = load("api.version_endpoints.list_version_endpoints")
    set_endpoint = load("api.model_endpoints.set_model_endpoint")
    route_table = load("api.gateways.get_route_table")
    audit = load("api.operations.list_audit_entries")
    health = load("api.operations.get_health")

    where = {"project": "client", "model": "scorer"}
    # A body the API refuses comes back as the documented error model.
    refused = deploy.sync_detailed(
        **where, version="1", client=client,
        body=models.VersionEndpointSpec(type_=models.VersionEndpointSpecType.CUSTOM),
    )  # fmt: skip
    assert refused.status_code == 422
    assert isinstance(refused.parsed, models.ErrorResponse)
    assert refused.parsed.error.fields[0].path == "(body)"

    spec = models.VersionEndpointSpec(
        type_=models.VersionEndpointSpecType.CUSTOM, command=EXAMPLE, ready_deadline_seconds=30
    )
    accepted = deploy.sync_detailed(**where, version="1", client=client, body=spec)
    assert accepted.status_code == 202, accepted.content
    assert isinstance(accepted.parsed, models.VersionEndpoint)
    assert accepted.parsed.status == models.VersionEndpointStatus.PENDING
    assert accepted.headers["ETag"] == f'"{accepted.parsed.generation}"'

    status = None
    for _ in range(600):
        version = get_version.sync(**where, version="1", client=client)
        status = version.status
        if status == models.VersionEndpointStatus.RUNNING:
            break
        assert status == models.VersionEndpointStatus.PENDING, version.message
        time.sleep(0.1)
    assert status == models.VersionEndpointStatus.RUNNING

    rule = models.Rule(destinations=[models.Destination(version="1", weight=100)])
    created = set_endpoint.sync_detailed(
        **where, client=client, body=models.ModelEndpointBody(rule=rule)
    )
    assert created.status_code == 201, created.content
    assert isinstance(created.parsed, models.ModelEndpoint)
    assert created.parsed.rule.destinations[0].version == "1"

    table = route_table.sync(client=client)
    assert isinstance(table, models.RouteTableSpec)
    [entry] = [e for e in table.model_endpoints if e.project == "client"]
    assert entry.rule.destinations[0].version == "1"
    [version_entry] = [e for e in table.version_endpoints if e.project == "client"]
    assert isinstance(version_entry, models.RouteTableVersionEndpoint)
    assert len(version_entry.replicas) == 1

    listed = list_versions.sync(**where, client=client)
    assert [v.status for v in listed.versions] == [models.VersionEndpointStatus.SERVING]
    log = audit.sync(client=client, limit=10)
    assert [e.action for e in log.entries][-2:] == ["deploy", "set_endpoint"]
    assert health.sync(client=client).status == "ok"


# --- the edges the document describes -------------------------------------------------------


def test_405_names_the_allowed_methods_on_every_path(controller: str) -> None:
    doc = live_document(controller)
    for path, item in doc["paths"].items():
        documented = {m.upper() for m in item if m != "parameters"}
        allowed = documented | ({"HEAD"} if "GET" in documented else set())
        for method in METHODS:
            if method in documented:
                continue
            answer = call(controller, method, concrete(path))
            assert answer.status == 405, (method, path, answer)
            listed = {m.strip() for m in answer.headers["Allow"].split(",")}
            assert listed == allowed, (method, path, answer.headers["Allow"])
            assert answer.error["code"] == "method_not_allowed"
            assert method in answer.error["message"]


def test_401_asks_for_a_bearer_token(controller: str) -> None:
    answer = call(controller, "GET", "/v1/routes", headers={"Authorization": ""})
    assert answer.status == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert answer.error["code"] == "unauthorized"


def test_watch_aaa_is_refused(controller: str) -> None:
    answer = call(controller, "GET", "/v1/routes?watch=AAA")
    assert answer.status == 422, answer
    assert answer.error["fields"] == [{"path": "watch", "message": "one of 0, 1, false, true"}]


def test_every_query_parameter_is_validated(controller: str) -> None:
    doc = live_document(controller)
    checked = []
    for path, method, op in operations(doc):
        for param in op.get("parameters", []):
            if param["in"] != "query":
                continue
            name, schema = param["name"], param["schema"]
            if "enum" in schema:
                good, bad = list(schema["enum"]), ["AAA", "", "TRUE", " 1"]
            else:
                assert schema["type"] == "integer", param
                low, high = schema["minimum"], schema["maximum"]
                good = [str(low), str(high), str(schema["default"])]
                bad = ["x", "1.5", " 7", "+7", "1_0", str(low - 1), str(high + 1)]
            for value in bad:
                answer = call(controller, method, f"{concrete(path)}?{name}={quote(value)}")
                assert answer.status == 422, (path, name, value, answer)
                assert answer.error["code"] == "invalid"
                assert [f["path"] for f in answer.error["fields"]] == [name], answer
            for value in good:
                # Only the head: with watch the answer is an endless stream.
                answer = call(controller, method, f"{concrete(path)}?{name}={quote(value)}",
                              read_body=False)  # fmt: skip
                # Accepted; what then (200, or 404 for the made-up version) isn't the point.
                assert answer.status != 422 and answer.status < 500, (path, name, value, answer)
            checked.append(name)
    assert {"watch", "since", "limit"} <= set(checked), checked


def test_unknown_and_repeated_query_parameters_are_refused(controller: str) -> None:
    doc = live_document(controller)
    for path, method, _ in operations(doc):
        if method != "GET":
            continue
        answer = call(controller, method, concrete(path) + "?wacth=1")
        assert answer.status == 422, (path, answer)
        [field] = answer.error["fields"]
        assert field["path"] == "wacth" and "not a query parameter" in field["message"]
    answer = call(controller, "GET", "/v1/audit?limit=5&limit=6")
    assert answer.status == 422 and "more than once" in answer.error["message"]
    answer = call(controller, "GET", "/v1/routes?watch=0&since=3")
    assert answer.status == 200 and "revision" in answer.body


VALID_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    (BASE + "/versions/{version}/endpoint", "PUT"): {
        "type": "custom", "command": ["python3", "model.py"],
        "resource_request": {"min_replica": 1, "max_replica": 2},
        "autoscaling_policy": {"metrics_type": "rps", "target_value": 5}, "env_vars": {"A": "1"},
    },
    (BASE + "/endpoint", "PUT"): {
        "rule": {"destinations": [{"version": "1", "weight": 100}],
                 "match": [{"header": "X-Canary", "exact": "1", "version": "1"}],
                 "sticky": {"header": "X-User"},
                 "mirror": {"version": "1", "percent": 5}},
        "protocol": "HTTP_JSON",
    },
    (BASE + "/endpoint:switch", "POST"): {"to_version": "2"},
    (BASE + "/endpoint:rollback", "POST"): {"to_revision": 3},
    ("/v1/activations", "POST"): {"project": "docs", "model": "scorer", "version": "1"},
}  # fmt: skip


def _leaves(body: Any, at: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Every field path in a body, containers first."""
    if at:
        yield at
    if isinstance(body, dict):
        for key, value in body.items():
            yield from _leaves(value, (*at, key))
    elif isinstance(body, list):
        for i, value in enumerate(body):
            yield from _leaves(value, (*at, i))


def _with(body: Any, at: tuple[str | int, ...], value: Any) -> Any:
    out = copy.deepcopy(body)
    node = out
    for part in at[:-1]:
        node = node[part]
    if value is NO_BODY:
        del node[at[-1]]
    else:
        node[at[-1]] = value
    return out


def _enums(doc: dict[str, Any], schema: Any, at: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths of every enum field in a body schema, through nested objects."""
    if "$ref" in schema:
        schema = resolve(doc, schema["$ref"])
    if "enum" in schema:
        yield at
    for name, prop in schema.get("properties", {}).items():
        yield from _enums(doc, prop, (*at, name))


def test_body_enums_are_enforced(controller: str) -> None:
    doc = live_document(controller)
    checked = []
    for (path, method), valid in VALID_BODIES.items():
        op = doc["paths"][path][method.lower()]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        for at in _enums(doc, schema):
            body = copy.deepcopy(valid)
            node = body
            for part in at[:-1]:
                node = node.setdefault(part, {})
            node[at[-1]] = "AAA"
            # If-Match on something that doesn't exist: a body accepted by mistake still
            # deploys nothing.
            answer = call(controller, method, concrete(path), body, headers={"If-Match": '"1"'})
            assert answer.status == 422, (path, at, answer)
            assert ".".join(at) in [f["path"] for f in answer.error["fields"]], answer
            checked.append(".".join(at))
    assert {"type", "protocol", "autoscaling_policy.metrics_type"} <= set(checked), checked


PYTHON_REPRS = re.compile(r"\bNone\b|\[\]|\{\}|\bdict\b|instance of|Value error")


def test_error_messages_never_show_python_reprs(controller: str) -> None:
    seen = 0

    def check(answer: Answer, what: Any) -> None:
        nonlocal seen
        if answer.status < 400:
            return
        err = answer.error
        texts = [err["message"], *(f["message"] for f in err["fields"])]
        texts += [f["path"] for f in err["fields"]]
        for text in texts:
            assert not PYTHON_REPRS.search(text), (what, answer)
        assert err["message"].strip(), (what, answer)
        seen += 1

    for (path, method), valid in VALID_BODIES.items():
        url = concrete(path)
        # If-Match on what doesn't exist: nothing gets deployed or routed by a variant
        # that happens to be valid.
        guard = {"If-Match": '"7"'}
        for body in (None, [], {}, "", 0, "x", [None], {"": None}):
            check(call(controller, method, url, body, headers=guard), body)
        for at in _leaves(valid):
            for value in (None, NO_BODY, [], {}, [None], {"a": None}):
                body = _with(valid, at, value)
                check(call(controller, method, url, body, headers=guard), body)
    # State refusals whose subjects are missing.
    base = concrete(BASE)
    for method, path, body in [
        ("PUT", base + "/endpoint", VALID_BODIES[(BASE + "/endpoint", "PUT")]),
        ("DELETE", base + "/endpoint", NO_BODY),
        ("DELETE", base + "/versions/1/endpoint", NO_BODY),
        ("POST", base + "/endpoint:switch", NO_BODY),
        ("POST", base + "/endpoint:rollback", {"to_revision": 1}),
        ("GET", base + "/endpoint", NO_BODY),
        ("GET", "/v1/projects/Bad_Name/models/x/versions", NO_BODY),
        ("GET", "/nowhere", NO_BODY),
    ]:
        check(call(controller, method, path, body, headers={"If-Match": '"7"'}), (method, path))
    assert seen > 100
