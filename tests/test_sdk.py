"""The Python SDK against a real `merlin-dp up`: deploy from objects, classes, a fitted
estimator, a model directory written for Merlin and a command; route, mirror, switch,
roll back, watch and predict through the stable URL; every refusal as its own exception.

The models are defined in this module, so they are packaged the way a notebook's are:
this module is not an installed distribution, so cloudpickle carries it by value, and
the replicas (separate processes started by the controller) load them from the package
alone.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from merlin_dp.common.net import free_port
from merlin_dp.protos.caraml.upi.v1 import upi_pb2_grpc
from merlin_dp.sdk import (
    AsyncClient,
    Client,
    Conflict,
    DeployFailed,
    Invalid,
    NotFound,
    PackagingError,
    PyFuncModel,
    StaleRevision,
    Unauthorized,
    Unreachable,
    package,
)
from merlin_dp.servers.package import MANIFEST, Manifest
from tests.conftest import ROOT, Up, running_controller, running_up
from tests.test_upi_server import DOUBLE, make_table, request, scores

CRASH = [sys.executable, "-c", "print('boom: no weights file'); raise SystemExit(3)"]


class Scaler(PyFuncModel):
    """Written to Merlin's contract: an artifact read in initialize, headers in infer."""

    def initialize(self, artifacts: dict[str, str]) -> None:
        self.scale = json.loads(Path(artifacts["config"]).read_text())["scale"]

    def infer(self, request: Any, **kwargs: Any) -> Any:
        return {
            "scaled": [self.scale * x for x in request["instances"]],
            "tenant": kwargs["headers"].get("X-Tenant"),
        }


class Doubler:
    """This server's own contract, with no load(): a class, constructed where it runs."""

    def predict(self, payload: Any) -> Any:
        return {"scaled": [2 * x for x in payload["instances"]], "tenant": None}


class HoldsALock:
    def __init__(self) -> None:
        self.guard = threading.Lock()

    def predict(self, payload: Any) -> Any:
        return payload


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp("sdk")) as server:
        yield server


def test_a_notebook_flow_deploys_objects_routes_and_predicts(up: Up, tmp_path: Path) -> None:
    client = Client(up.api)
    config = tmp_path / "config.json"
    config.write_text('{"scale": 3}')
    v1 = client.deploy("sdk/scale/1", model=Scaler(), artifacts={"config": config},
                       package_dir=tmp_path / "pkg1", wait=60)  # fmt: skip
    assert v1.status == "running" and v1.spec.type == "pyfunc" and v1.spec.pyfunc_class == ""
    manifest = Manifest.read(tmp_path / "pkg1")
    assert manifest.model_class == "tests.test_sdk.Scaler" and not manifest.instantiate
    assert manifest.artifacts == {"config": "artifacts/config/config.json"}
    v2 = client.deploy("sdk/scale/2", model=Doubler, wait=60)  # a class; default directory
    assert v2.status == "running"
    assert Path(v2.spec.model_dir).parent == ROOT / ".merlin-dp" / "packages"

    first = client.route("sdk/scale", {"1": 100})
    assert first.url.startswith("http://scale.sdk.localhost:")
    answer = client.predict("sdk/scale", {"instances": [1, 2]}, headers={"X-Tenant": "acme"})
    assert (answer.result, answer.version) == ({"scaled": [3, 6], "tenant": "acme"}, "1")
    assert answer.request_id
    direct = client.predict("sdk/scale", {"instances": [5]}, version="2")
    assert (direct.result, direct.version) == ({"scaled": [10], "tenant": None}, "2")

    # Canary 90/10, then 50/50: only the split changes, by read-modify-write.
    client.set_sticky("sdk/scale", header="X-User")
    canary = client.set_weights("sdk/scale", {"1": 50, "2": 50})
    assert canary.rule.sticky is not None and canary.rule.sticky.header == "X-User"
    served = Counter(
        client.predict("sdk/scale", {"instances": [1]}, headers={"X-User": f"u{i}"}).version
        for i in range(60)
    )
    assert set(served) == {"1", "2"}, served
    client.set_sticky("sdk/scale")  # neither: unpinned again
    matched = client.set_match("sdk/scale", [{"header": "X-Tenant", "exact": "beta",
                                              "version": "2"}])  # fmt: skip
    assert matched.rule.match[0].version == "2" and matched.rule.sticky is None
    beta = client.predict("sdk/scale", {"instances": [1]}, headers={"X-Tenant": "beta"})
    assert beta.version == "2"
    client.set_match("sdk/scale", [])

    shadowed = client.set_mirror("sdk/scale", "2", 100)
    assert shadowed.rule.mirror is not None and shadowed.rule.mirror.version == "2"
    switched = client.switch("sdk/scale", "2")
    assert [(d.version, d.weight) for d in switched.rule.destinations] == [("2", 100)]
    assert client.predict("sdk/scale", {"instances": [4]}).version == "2"
    back = client.rollback("sdk/scale")
    assert back.revision > switched.revision
    assert [(d.version, d.weight) for d in back.rule.destinations] == [("1", 50), ("2", 50)]

    status = client.status("sdk/scale")
    assert status.endpoint is not None and status.endpoint.revision == back.revision
    assert [v.version for v in status.versions] == ["1", "2"]
    assert "1=50% 2=50%; mirror 100% -> 2" in str(status)
    revisions = [h.revision for h in client.history("sdk/scale")]
    assert revisions[-1] == back.revision and revisions == sorted(revisions)
    assert any("loaded" in line for entry in client.logs("sdk/scale/1").logs
               for line in entry.lines)  # fmt: skip

    # Someone else's change in between: the stale revision is refused, nothing applied.
    with pytest.raises(StaleRevision) as stale:
        client.route("sdk/scale", {"1": 100}, if_match=first.revision)
    assert stale.value.status == 412
    assert client.endpoint("sdk/scale").revision == back.revision

    # watch: how the traffic is now, then the next change.
    changes = client.watch("sdk/scale")
    now = next(changes)
    assert now.endpoint is not None and [v.version for v in now.versions] == ["1", "2"]
    client.set_mirror("sdk/scale", None)
    after = next(changes)
    assert after.endpoint is not None and after.endpoint.rule.mirror is None
    assert after.revision > now.revision
    changes.close()

    client.delete_endpoint("sdk/scale")
    for version in ("1", "2"):
        assert client.undeploy(f"sdk/scale/{version}").status == "terminated"


def test_a_fitted_estimator_is_served_as_it_predicts_here(up: Up) -> None:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    features, labels = load_iris(return_X_y=True)
    estimator = LogisticRegression(max_iter=500).fit(features, labels)
    client = Client(up.api)
    version = client.deploy("sdk/iris/1", model=estimator, wait=60)
    assert version.spec.type == "sklearn"
    pins = (Path(version.spec.model_dir) / "requirements.txt").read_text().splitlines()
    import sklearn

    assert f"scikit-learn=={sklearn.__version__}" in pins, pins
    client.route("sdk/iris", {"1": 100})
    rows = features[::30]  # a numpy array, sent as it is
    answer = client.predict("sdk/iris", {"instances": rows})
    assert answer.result == {"predictions": estimator.predict(rows).tolist()}
    client.delete_endpoint("sdk/iris")
    client.undeploy("sdk/iris/1")


def test_a_model_directory_written_for_merlin_runs_unchanged(up: Up, tmp_path: Path) -> None:
    """The file imports merlin-sdk's base class; merlin-sdk isn't installed here, so the
    pyfunc server's stand-in provides it (tests/test_merlin_published.py runs the same
    kind of file in the published merlin-pyfunc-server)."""
    model_dir = tmp_path / "merlin-model"
    (model_dir / "artifacts").mkdir(parents=True)
    (model_dir / "artifacts" / "weights.json").write_text('{"w": [0.5, 2.0]}')
    (model_dir / "linear.py").write_text(
        "import json\n"
        "import merlin\n"
        "from merlin.pyfunc import PyFuncModel\n\n\n"
        "class Linear(PyFuncModel):\n"
        "    def initialize(self, artifacts: dict):\n"
        "        with open(artifacts['weights']) as f:\n"
        "            self.w = json.load(f)['w']\n\n"
        "    def infer(self, request: dict, **kwargs) -> dict:\n"
        "        rows = request['instances']\n"
        "        return {'predictions': [sum(a * b for a, b in zip(self.w, r)) for r in rows],\n"
        "                'caller': kwargs['headers'].get('X-Caller'),\n"
        "                'base': merlin.PyFuncModel.__module__}\n"
    )
    client = Client(up.api)
    client.deploy("sdk/linear/1", model_dir=model_dir, pyfunc_class="linear:Linear", wait=60)
    client.route("sdk/linear", {"1": 100})
    # Header names reach infer() as merlin-pyfunc-server (tornado) names them.
    answer = client.predict("sdk/linear", {"instances": [[2, 1], [4, 0]]},
                            headers={"x-CALLER": "notebook"})  # fmt: skip
    assert answer.result == {"predictions": [3.0, 2.0], "caller": "notebook",
                             "base": "merlin_dp.servers.merlin_contract"}  # fmt: skip
    client.delete_endpoint("sdk/linear")
    client.undeploy("sdk/linear/1")


MERLIN_UPI_MODEL = """\
from caraml.upi.v1 import table_pb2, upi_pb2
from merlin.pyfunc import PyFuncModel


class Doubler(PyFuncModel):
    def initialize(self, artifacts: dict):
        with open(artifacts["factor"]) as f:
            self.factor = float(f.read())

    def upiv1_infer(self, request, context):
        rows = [
            table_pb2.Row(row_id=row.row_id, values=[
                table_pb2.Value(double_value=self.factor * row.values[0].double_value)])
            for row in request.prediction_table.rows
        ]
        table = table_pb2.Table(name="scores", rows=rows,
                                columns=[table_pb2.Column(name="score", type=2)])
        return upi_pb2.PredictValuesResponse(
            prediction_result_table=table, target_name=request.target_name,
            metadata=upi_pb2.ResponseMetadata(prediction_id=request.metadata.prediction_id))
"""


def test_a_upi_class_written_for_merlin_answers_grpc_unchanged(up: Up, tmp_path: Path) -> None:
    """``upiv1_infer`` with caraml-upi-protos' messages (this project's stubs stand in)."""
    model_dir = tmp_path / "upi-model"
    (model_dir / "artifacts").mkdir(parents=True)
    (model_dir / "artifacts" / "factor.txt").write_text("2.5")
    (model_dir / "doubler.py").write_text(MERLIN_UPI_MODEL)
    client = Client(up.api)
    client.deploy("sdk/rows/1", model_dir=model_dir, pyfunc_class="doubler:Doubler",
                  protocol="UPI_V1", wait=60)  # fmt: skip
    client.route("sdk/rows", {"1": 100}, protocol="UPI_V1")
    options = [("grpc.default_authority", "rows.sdk.localhost")]
    with grpc.insecure_channel(f"127.0.0.1:{up.grpc_port}", options=options) as channel:
        stub = upi_pb2_grpc.UniversalPredictionServiceStub(channel)  # type: ignore[no-untyped-call]
        table = make_table([("a", DOUBLE)], [("r1", [2.0]), ("r2", [4.0])])
        answer = stub.PredictValues(request(table, prediction_id="p-7"), timeout=10)
    assert scores(answer) == [("r1", 5.0), ("r2", 10.0)]
    assert (answer.target_name, answer.metadata.prediction_id) == ("score", "p-7")
    client.delete_endpoint("sdk/rows")
    client.undeploy("sdk/rows/1")


def test_refusals_are_exceptions_a_caller_can_catch(up: Up, tmp_path: Path) -> None:
    client = Client(up.api)
    with pytest.raises(NotFound) as missing:
        client.version("sdk/nothing/1")
    assert missing.value.code == "not_found" and "sdk/nothing/1" in missing.value.message
    with pytest.raises(NotFound):
        client.status("sdk/nothing")

    # Invalid before anything is sent: the rule's own validation, with its field path.
    with pytest.raises(Invalid) as invalid:
        client.route("sdk/refused", {"1": 90})
    assert [f.path for f in invalid.value.fields] == ["rule"]
    assert "weights must sum to 100, got 90" in invalid.value.fields[0].message
    # ...and the API's, for what only the controller knows.
    with pytest.raises(Conflict) as conflict:
        client.route("sdk/refused", {"1": 100})
    assert "sdk/refused/1 is not deployed" in conflict.value.message
    with pytest.raises(Invalid) as body:
        client.deploy("sdk/refused/1", spec={"type": "custom", "command": ["x"], "cpu": 1})
    assert [f.path for f in body.value.fields] == ["cpu"]

    # A replica that exits at once: DeployFailed with the reason and its last lines.
    with pytest.raises(DeployFailed) as failed:
        client.deploy("sdk/crash/1", command=CRASH, wait=60)
    assert failed.value.reason.startswith("crash loop:")
    assert "boom: no weights file" in failed.value.logs
    assert failed.value.version.status == "failed"
    client.undeploy("sdk/crash/1")

    # What can't be packaged is refused here, naming the attribute, before any call.
    with pytest.raises(PackagingError, match=r"attribute 'guard'.*create them in initialize"):
        client.deploy("sdk/lock/1", model=HoldsALock())
    with pytest.raises(PackagingError, match="neither infer"):
        client.deploy("sdk/fn/1", model=object())
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(PackagingError, match="is not fitted"):
        client.deploy("sdk/unfitted/1", model=LogisticRegression())
    with pytest.raises(NotFound):
        client.version("sdk/lock/1")

    # A package the replica can't load fails the version, saying why.
    packed = package(Doubler(), tmp_path / "needs", requirements=["no-such-dist==1.0"])
    with pytest.raises(DeployFailed) as unmet:
        client.deploy("sdk/needs/1", model_dir=packed.path, wait=60)
    assert "needs no-such-dist==1.0, not installed where the replica runs" in str(unmet.value)
    client.undeploy("sdk/needs/1")
    manifest = packed.path / MANIFEST
    here = f'"python": "{sys.version_info.major}.{sys.version_info.minor}"'
    manifest.write_text(manifest.read_text().replace(here, '"python": "3.99"'))
    with pytest.raises(DeployFailed) as other_python:
        client.deploy("sdk/needs/1", model_dir=packed.path, wait=60)
    assert "packaged with Python 3.99" in str(other_python.value)
    client.undeploy("sdk/needs/1")

    with pytest.raises(Unreachable, match="cannot reach"):
        Client(f"http://127.0.0.1:{free_port()}").versions("sdk/x")


def test_a_token_is_sent_and_a_bad_one_is_unauthorized(tmp_path: Path) -> None:
    tokens = "tokens:\n  - {name: ci, token: right-token, access: read, projects: ['*']}\n"
    with running_controller(tmp_path, tokens) as api:
        assert Client(api, token="right-token").versions("sdk/none") == []
        assert Client(api, token="right-token").whoami().access == "read"
        with pytest.raises(Unauthorized) as refused:
            Client(api, token="wrong").versions("sdk/none")
        assert refused.value.status == 401


async def test_the_async_client_does_the_same_over_asyncio(up: Up, tmp_path: Path) -> None:
    async with AsyncClient(up.api) as client:
        version = await client.deploy("sdk/aio/1", model=Doubler(), wait=60)
        assert version.status == "running"
        endpoint = await client.route("sdk/aio", {"1": 100})
        answers = await asyncio.gather(
            *(client.predict("sdk/aio", {"instances": [i]}) for i in range(5))
        )
        assert [a.result["scaled"] for a in answers] == [[0], [2], [4], [6], [8]]
        watching = client.watch("sdk/aio")
        now = await anext(watching)
        assert now.endpoint is not None and now.endpoint.rule.destinations[0].version == "1"
        with pytest.raises(StaleRevision):
            await client.route("sdk/aio", {"1": 100}, if_match=endpoint.revision - 1)
        await client.set_mirror("sdk/aio", "1", 10)
        changed = await anext(watching)
        assert changed.endpoint is not None and changed.endpoint.rule.mirror is not None
        await watching.aclose()
        lines = client.follow_logs("sdk/aio/1", lines=5)
        first = await asyncio.wait_for(anext(lines), 30)
        assert first.startswith("==> sdk_aio_1-"), first
        await lines.aclose()
        await client.delete_endpoint("sdk/aio")
        assert (await client.undeploy("sdk/aio/1")).status == "terminated"


def test_packaging_records_requirements_and_carries_local_code(tmp_path: Path) -> None:
    import numpy

    class WithNumpy:
        def predict(self, payload: Any) -> Any:
            return numpy.asarray(payload).tolist()

    packed = package(WithNumpy(), tmp_path / "p")
    assert packed.kind == "pyfunc" and (packed.path / MANIFEST).exists()
    pins = packed.manifest.requirements
    assert f"numpy=={numpy.__version__}" in pins and any(
        p.startswith("cloudpickle==") for p in pins
    )
    assert not any(p.startswith(("merlin-dataplane", "pytest")) for p in pins), pins
    again = package(WithNumpy(), tmp_path / "p")
    assert again.path == packed.path  # same contents, same directory
    with pytest.raises(PackagingError, match="needs scale"):

        class NeedsArgs:
            def __init__(self, scale: float) -> None:
                self.scale = scale

            def predict(self, payload: Any) -> Any:
                return payload

        package(NeedsArgs, tmp_path / "q")
