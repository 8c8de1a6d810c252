"""The Kubernetes manifests in deploy/: typed, structural, least-privilege, in sync.

Every YAML document is read into the official client's typed model for its kind and
written back: the models ignore keys they don't know, so a misspelled field shows up as
a difference between the input and the round trip. The CRD must be what
deploy/generate_crd.py makes from merlin_dp/spec/rule.py now, and structural. No cluster, no
network.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
import yaml
from kubernetes import client as k8s
from pydantic import ValidationError

from merlin_dp.spec.rule import Rule

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GROUP = "merlin-dp.caraml.dev"
LABELS = (f"{GROUP}/project", f"{GROUP}/model", f"{GROUP}/version")
IMAGE = (
    "merlin-dataplane:" + tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
)

Doc = dict[str, Any]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_crd", DEPLOY / "generate_crd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the module's annotations there
    spec.loader.exec_module(module)
    return module


GEN = _generator()


def _load() -> list[tuple[str, Doc]]:
    docs: list[tuple[str, Doc]] = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path}#{i} is not a mapping"
            docs.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return docs


DOCS = _load()


def _ident(item: tuple[str, Doc]) -> str:
    where, doc = item
    return f"{where}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def of_kind(*kinds: str) -> list[Doc]:
    return [doc for _, doc in DOCS if doc.get("kind") in kinds]


def named(kind: str, name: str) -> Doc:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def differences(given: Any, back: Any, path: str = "") -> Iterator[str]:
    """Where the round trip through the typed model lost or changed something."""
    if isinstance(given, dict) and isinstance(back, dict):
        for key in given.keys() | back.keys():
            where = f"{path}.{key}"
            if key not in back:
                yield f"{where}: not a field of the typed model (misspelled?)"
            elif key not in given:
                yield f"{where}: appeared in the round trip"
            else:
                yield from differences(given[key], back[key], where)
    elif isinstance(given, list) and isinstance(back, list):
        if len(given) != len(back):
            yield f"{path}: {len(given)} items became {len(back)}"
        for i, (a, b) in enumerate(zip(given, back, strict=False)):
            yield from differences(a, b, f"{path}[{i}]")
    elif given != back or isinstance(given, bool) != isinstance(back, bool):
        yield f"{path}: {given!r} became {back!r}"


def model_name(doc: Doc) -> str:
    """apps/v1 Deployment -> V1Deployment (the client's class naming)."""
    version = str(doc["apiVersion"]).rpartition("/")[2]
    return version[0].upper() + version[1:] + str(doc["kind"])


BUILTIN = [item for item in DOCS if item[1].get("kind") != "ModelEndpoint"]


def test_deploy_has_what_the_docs_promise() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ModelEndpoint",
    } <= kinds
    assert (ROOT / "docs" / "kubernetes.md").exists()


@pytest.mark.parametrize("item", BUILTIN, ids=_ident)
def test_document_is_a_typed_kubernetes_object(item: tuple[str, Doc]) -> None:
    where, doc = item
    name = model_name(doc)
    assert hasattr(k8s, name), f"{where}: no client model {name} for {doc['apiVersion']}"
    api: Any = k8s.ApiClient()  # sanitize_for_serialization is untyped
    # The public path a response takes: JSON text in, typed model out (strict types:
    # a number where a string belongs, such as an unquoted label value, is refused).
    obj = api.deserialize(json.dumps(doc), name, "application/json")
    assert type(obj).__name__ == name
    back = api.sanitize_for_serialization(obj)
    assert list(differences(doc, back)) == [], where


def test_round_trip_catches_a_misspelled_field() -> None:
    doc = json.loads(json.dumps(named("Deployment", "merlin-dp-gateway")))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    api: Any = k8s.ApiClient()
    back = api.sanitize_for_serialization(api.deserialize(json.dumps(doc), "V1Deployment", None))
    assert any("readinesProbe: not a field" in d for d in differences(doc, back))


def test_namespaced_objects_live_in_the_platform_namespace() -> None:
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole"}
    for where, doc in DOCS:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == "merlin-dp", where


# -- the CRD ---------------------------------------------------------------------------


def crd() -> Doc:
    return named("CustomResourceDefinition", f"modelendpoints.{GROUP}")


def test_crd_is_what_the_generator_makes_from_the_rule_model() -> None:
    committed = (DEPLOY / "crd-modelendpoint.yaml").read_text(encoding="utf-8")
    assert committed == GEN.render(), "stale CRD: run python deploy/generate_crd.py"
    assert GEN.main(["--check"]) == 0


def test_crd_names_version_and_subresources() -> None:
    spec = crd()["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "ModelEndpoint"
    assert spec["names"]["plural"] == "modelendpoints"
    assert spec["names"]["shortNames"] == ["me"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Revision"] == ".status.routeRevision"
    assert columns["Age"] == ".metadata.creationTimestamp"


def schema_nodes(node: Doc, path: str = "") -> Iterator[tuple[str, Doc]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from schema_nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_nodes(node["additionalProperties"], f"{path}.*")


STRUCTURAL_KEYS = {
    "description",
    "type",
    "format",
    "nullable",
    "default",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}


def problems(schema: Doc) -> Iterator[str]:
    """The parts of Kubernetes' structural-schema rules a pydantic schema could break."""
    for path, node in schema_nodes(schema):
        where = path or "."
        if "type" not in node:
            yield f"{where}: no type"
        elif node["type"] not in ("object", "array", "string", "integer", "number", "boolean"):
            yield f"{where}: type {node['type']!r}"
        for key in node.keys() - STRUCTURAL_KEYS:
            yield f"{where}: {key!r} is not allowed here ($ref, anyOf, title, ...)"
        if "properties" in node and "additionalProperties" in node:
            yield f"{where}: properties and additionalProperties together"
        if node.get("additionalProperties") is False:
            yield f"{where}: additionalProperties: false"
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in node and node[key] is not True:
                yield f"{where}: {key} must be a boolean beside minimum/maximum"
        if node.get("type") == "array" and "items" not in node:
            yield f"{where}: array without items"
        for required in node.get("required", []):
            if required not in node.get("properties", {}):
                yield f"{where}: requires unknown {required!r}"
        if "default" in node and node["default"] is None:
            yield f"{where}: null default"


def test_crd_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert list(problems(schema)) == []
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text and "anyOf" not in text


def test_structural_check_catches_what_pydantic_emits() -> None:
    raw = Rule.model_json_schema()
    found = list(problems(raw))
    assert any("'$ref'" in p or "'anyOf'" in p for p in found)
    assert any("additionalProperties: false" in p for p in found)


def test_generator_refuses_what_it_cannot_translate() -> None:
    with pytest.raises(GEN.SchemaError, match="anyOf"):
        GEN.structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})
    with pytest.raises(GEN.SchemaError, match="oneOf"):
        GEN.structural({"type": "object", "oneOf": []}, {})
    with pytest.raises(GEN.SchemaError, match="type"):
        GEN.structural({"description": "anything"}, {})


def test_crd_spec_schema_follows_the_rule_model() -> None:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rule = spec["properties"]["rule"]
    assert set(rule["properties"]) == set(Rule.model_fields)
    assert spec["properties"]["protocol"]["enum"] == ["HTTP_JSON", "UPI_V1"]
    assert rule["properties"]["sticky"]["nullable"] is True
    timeout = rule["properties"]["timeout_seconds"]
    assert (timeout["minimum"], timeout["exclusiveMinimum"], timeout["default"]) == (0, True, 30.0)


def test_status_has_conditions_and_revisions() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]["properties"]
    assert {"observedGeneration", "conditions", "routeRevision"} <= set(status)
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


# -- the example ModelEndpoint -------------------------------------------------------------


JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def admit(value: Any, schema: Doc, path: str = "") -> Iterator[str]:
    """What the API server would refuse or silently prune, for the schema's keywords."""
    where = path or "."
    if value is None:
        if not schema.get("nullable"):
            yield f"{where}: null"
        return
    kind = schema["type"]
    wrong_bool = isinstance(value, bool) and kind != "boolean"
    if not isinstance(value, JSON_TYPES[kind]) or wrong_bool:
        yield f"{where}: {value!r} is not {kind}"
        return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            yield f"{where}: {value!r} does not match {schema['pattern']}"
        if len(value) > schema.get("maxLength", len(value)):
            yield f"{where}: longer than {schema['maxLength']}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value < low or (schema.get("exclusiveMinimum") and value == low)):
            yield f"{where}: {value} below the minimum"
        if high is not None and value > high:
            yield f"{where}: {value} above the maximum"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            yield f"{where}: fewer than {schema['minItems']} items"
        for i, item in enumerate(value):
            yield from admit(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict) and "properties" in schema:
        for name in schema.get("required", []):
            if name not in value:
                yield f"{where}: {name} is required"
        for name, item in value.items():
            if name not in schema["properties"]:
                yield f"{path}.{name}: unknown field (the API server would prune it)"
            else:
                yield from admit(item, schema["properties"][name], f"{path}.{name}")


def spec_schema() -> Doc:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return cast(Doc, schema["properties"]["spec"])


def example() -> Doc:
    (found,) = of_kind("ModelEndpoint")
    return found


def test_example_model_endpoint_fits_the_crd_and_the_rule_model() -> None:
    doc = example()
    assert doc["apiVersion"] == f"{GROUP}/v1alpha1"
    assert list(admit(doc["spec"], spec_schema())) == []
    GEN.ModelEndpointSpec.model_validate(doc["spec"])
    rule = Rule.model_validate(doc["spec"]["rule"])
    assert {d.version: d.weight for d in rule.destinations} == {"1": 90, "2": 10}


def test_schema_check_catches_typos_and_types() -> None:
    spec = json.loads(json.dumps(example()["spec"]))
    spec["rule"]["destinations"][0]["weigth"] = 5
    spec["rule"]["retries"] = "2"
    spec["protocol"] = "GRPC"
    found = "\n".join(admit(spec, spec_schema()))
    assert "weigth: unknown field" in found
    assert "retries: '2' is not integer" in found
    assert "'GRPC' not in" in found


def test_cross_field_rules_are_left_to_the_controller() -> None:
    """The schema can't sum weights; Rule can, and the controller will say Ready=False."""
    spec = json.loads(json.dumps(example()["spec"]))
    spec["rule"]["destinations"][1]["weight"] = 20
    assert list(admit(spec, spec_schema())) == []
    with pytest.raises(ValidationError, match="weights must sum to 100, got 110"):
        Rule.model_validate(spec["rule"])


def test_example_destinations_are_example_version_endpoints() -> None:
    spec = example()["spec"]
    services = {
        tuple(s["metadata"]["labels"].get(k) for k in LABELS)
        for s in of_kind("Service")
        if LABELS[0] in s["metadata"].get("labels", {})
    }
    for d in spec["rule"]["destinations"]:
        assert (spec["project"], spec["model"], d["version"]) in services


# -- RBAC --------------------------------------------------------------------------------

# Everything the design uses; nothing else may be granted, and all of it must be.
# tests/test_kubernetes.py checks the other direction: every call the controller makes
# against the API stand-in is granted here.
NEEDED = {
    (GROUP, "modelendpoints"): {"list", "watch", "create", "patch", "delete"},
    (GROUP, "modelendpoints/status"): {"patch"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("apps", "deployments/scale"): {"patch"},
    ("coordination.k8s.io", "leases"): {"get", "create", "patch"},
}


def grants() -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for role in of_kind("Role", "ClusterRole"):
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule, role["metadata"]["name"]
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_rbac_grants_exactly_what_the_design_uses() -> None:
    granted = grants()
    for (group, resource), verbs in granted.items():
        assert "*" not in verbs and group != "*" and resource != "*"
        assert verbs <= NEEDED.get((group, resource), set()), (group, resource, verbs)
    assert granted == NEEDED
    assert not any(resource in ("pods", "secrets") for _, resource in granted)


def test_nothing_is_granted_cluster_wide() -> None:
    assert of_kind("ClusterRoleBinding") == []
    leases = named("Role", "merlin-dp-controller-leader-election")
    for rule in leases["rules"]:
        if set(rule["verbs"]) & {"get", "patch"}:
            assert rule["resourceNames"] == ["merlin-dp-controller"]


def test_only_the_controller_is_bound() -> None:
    subjects = [s for b in of_kind("RoleBinding") for s in b["subjects"]]
    assert {(s["kind"], s["name"]) for s in subjects} == {
        ("ServiceAccount", "merlin-dp-controller")
    }
    for binding in of_kind("RoleBinding"):
        ref = binding["roleRef"]
        named(ref["kind"], ref["name"])  # refers to a role defined here


# -- workloads ---------------------------------------------------------------------------


def pod(deployment: Doc) -> Doc:
    return cast(Doc, deployment["spec"]["template"]["spec"])


def test_gateways_have_no_kubernetes_credentials() -> None:
    gateway = named("Deployment", "merlin-dp-gateway")
    assert pod(gateway)["serviceAccountName"] == "merlin-dp-gateway"
    assert pod(gateway)["automountServiceAccountToken"] is False
    assert named("ServiceAccount", "merlin-dp-gateway")["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    "deployment", of_kind("Deployment"), ids=lambda d: str(d["metadata"]["name"])
)
def test_every_pod_is_locked_down_probed_and_sized(deployment: Doc) -> None:
    spec = pod(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template_labels.items()
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert container["image"] == IMAGE
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        ports = {p["name"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in ports, probe


def test_gateway_deployment() -> None:
    gateway = named("Deployment", "merlin-dp-gateway")
    assert gateway["spec"]["replicas"] >= 2
    (container,) = pod(gateway)["containers"]
    args = container["args"]
    assert args[0] == "gateway"
    controller_url = args[args.index("--controller") + 1]
    service = named("Service", "merlin-dp-controller")
    assert (
        controller_url
        == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    )
    admin_port = int(args[args.index("--admin") + 1].rpartition(":")[2])
    listen_port = int(args[args.index("--listen") + 1].rpartition(":")[2])
    grpc_port = int(args[args.index("--grpc-port") + 1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": listen_port, "admin": admin_port, "grpc": grpc_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    anti = pod(gateway)["affinity"]["podAntiAffinity"]
    terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert terms[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = named("PodDisruptionBudget", "merlin-dp-gateway")
    assert pdb["spec"]["selector"] == gateway["spec"]["selector"]
    assert named("Service", "merlin-dp-gateway")["spec"]["ports"][0]["port"] == 8080


def test_controller_deployment() -> None:
    controller = named("Deployment", "merlin-dp-controller")
    assert controller["spec"]["replicas"] == 2  # one leads through the Lease
    assert controller["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (container,) = pod(controller)["containers"]
    assert "--kubernetes" in container["args"]
    admin_service = container["args"][container["args"].index("--gateway-admin-service") + 1]
    assert named("Service", admin_service)["spec"]["clusterIP"] == "None"  # every gateway
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    listen = container["args"][container["args"].index("--listen") + 1]
    assert int(listen.rpartition(":")[2]) == 8090
    assert named("Service", "merlin-dp-controller")["spec"]["ports"][0]["port"] == 8090
    assert pod(controller)["serviceAccountName"] == "merlin-dp-controller"


def test_every_service_selects_pods_of_a_deployment_here() -> None:
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind("Deployment")]
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), service
        names = {p["name"] for d in of_kind("Deployment") for c in pod(d)["containers"]
                 for p in c["ports"]}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names


def test_version_endpoints_carry_the_label_keys() -> None:
    versions = [d for d in of_kind("Deployment", "Service") if LABELS[0] in d["metadata"]["labels"]]
    assert len(versions) == 4  # iris 1 and 2: a Deployment and a Service each
    for obj in versions:
        labels = obj["metadata"]["labels"]
        assert all(isinstance(labels[k], str) for k in LABELS)
        if obj["kind"] == "Deployment":
            assert all(
                obj["spec"]["template"]["metadata"]["labels"][k] == labels[k] for k in LABELS
            )
            # Same name as its Service: the scale subresource is found without listing.
            named("Service", obj["metadata"]["name"])
            env = {e["name"]: e["value"] for e in pod(obj)["containers"][0]["env"]}
            model, version = labels[LABELS[1]], labels[LABELS[2]]
            assert env["CARAML_MODEL_FULL_NAME"] == f"{model}-{version}"
        else:
            assert obj["spec"]["ports"][0]["name"] in ("http", "grpc")


def test_no_secret_values_in_the_manifests() -> None:
    assert of_kind("Secret") == []
