"""KServe's own REST clients, V1 and V2, through the gateway's stable model URL.

The clients run in their own venv (tests/clients.py) against a real gateway in front of
the real shipped model servers, started as processes from the iris example: the sklearn
server (two versions, a weighted split) and the pyfunc server (examples/pyfunc).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from merlin_dp.common.net import free_port
from tests import clients
from tests.clients import run_kserve
from tests.conftest import ROOT, model_endpoint, version
from tests.test_strategies import wait_compared

kserve_python = clients.kserve_python  # the session fixture: KServe's own client venv

# The first test may wait for the kserve venv to be made (about a minute here).
pytestmark = pytest.mark.timeout(900)

IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
FLAT = [v for row in IRIS for v in row]


class ModelServer:
    """A shipped model server as the local runtime starts it: the replica contract's env."""

    def __init__(self, log: Path, module: str, model: str, ver: str, model_dir: Path,
                 *args: str) -> None:  # fmt: skip
        self.port = free_port()
        self.full_name = f"{model}-{ver}"
        self.log = log
        env = {
            **os.environ,
            "CARAML_HTTP_PORT": str(self.port),
            "CARAML_MODEL_NAME": model,
            "CARAML_MODEL_VERSION": ver,
            "CARAML_MODEL_FULL_NAME": self.full_name,
            "CARAML_ARTIFACT_LOCATION": str(model_dir),
        }
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        url = f"http://{self.address}/v1/models/{self.full_name}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.full_name} never became ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModelServer]]:
    """iris-1 and iris-2 (sklearn) and names-1 (pyfunc around iris-1's artifact)."""
    tmp = tmp_path_factory.mktemp("kserve")
    sys.path.insert(0, str(ROOT / "examples" / "iris"))
    try:
        from train import train  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "examples" / "iris"))
    models = tmp / "models"
    train(models)
    pyfunc_dir = tmp / "pyfunc"
    pyfunc_dir.mkdir()
    shutil.copy(models / "v1" / "model.joblib", pyfunc_dir)
    shutil.copy(ROOT / "examples" / "pyfunc" / "iris_names.py", pyfunc_dir)
    started = [
        ModelServer(tmp / "iris-1.log", "merlin_dp.servers.sklearn", "iris", "1", models / "v1"),
        ModelServer(tmp / "iris-2.log", "merlin_dp.servers.sklearn", "iris", "2", models / "v2"),
        ModelServer(tmp / "names-1.log", "merlin_dp.servers.pyfunc", "names", "1", pyfunc_dir,
                    "iris_names:IrisWithNames"),
    ]  # fmt: skip
    try:
        for s in started:
            s.wait_ready()
        yield {s.full_name: s for s in started}
    finally:
        for s in started:
            s.stop()


def routes(servers: dict[str, ModelServer]) -> dict[str, Any]:
    return {
        "version_endpoints": [
            version("demo", "iris", "1", [servers["iris-1"].address]),
            version("demo", "iris", "2", [servers["iris-2"].address]),
            version("demo", "names", "1", [servers["names-1"].address]),
        ],
        "model_endpoints": [
            model_endpoint("demo", "iris", {"1": 50, "2": 50}),
            model_endpoint("demo", "names", {"1": 100}),
        ],
    }


def at(gw: Any, model: str, form: str) -> dict[str, Any]:
    """Where a KServe client is pointed: the stable URL in Host form or path form."""
    base = f"http://127.0.0.1:{gw.port}"
    if form == "host":
        return {"base_url": base, "host": f"{model}.demo.localhost"}
    # The client joins its paths onto the base URL's own path, so the path form works.
    return {"base_url": f"{base}/serving/demo/{model}", "host": None}


def v2_inputs(datatype: str = "FP32", binary: bool = False) -> list[dict[str, Any]]:
    return [{"name": "x", "shape": [2, 4], "datatype": datatype, "data": FLAT, "binary": binary}]


async def test_kserve_v1_client_through_the_stable_url(
    kserve_python: Path, servers: dict[str, ModelServer], gateway_factory: Any
) -> None:
    gw = await gateway_factory(routes(servers))
    calls: list[dict[str, Any]] = []
    for form in ("host", "path"):
        where = {"protocol": "v1", "model": "iris", **at(gw, "iris", form)}
        calls += [
            {**where, "op": "is_server_live"},
            {**where, "op": "is_model_ready"},
            {**where, "op": "infer", "data": {"instances": IRIS}},
            # KServe's sklearn server also takes "inputs" for "instances".
            {**where, "op": "infer", "data": {"inputs": IRIS}},
        ]
    # The weighted split: the client's predict goes to both versions, each by its name.
    split = {"protocol": "v1", "model": "iris", "op": "infer", "data": {"instances": IRIS}}
    calls += [{**split, **at(gw, "iris", "host")}] * 40
    results = await run_kserve(kserve_python, calls)
    assert all("error" not in r for r in results), results
    for i in range(2):
        live, ready, instances, inputs = results[4 * i : 4 * i + 4]
        assert live["value"] is True
        assert ready["value"] is True
        assert instances["value"] == inputs["value"] == {"predictions": [0, 2]}
    versions = {r["version"] for r in results[8:]}
    assert versions == {"1", "2"}
    assert all(r["value"] == {"predictions": [0, 2]} for r in results[8:])


async def test_kserve_v2_client_sklearn_through_the_stable_url(
    kserve_python: Path, servers: dict[str, ModelServer], gateway_factory: Any
) -> None:
    gw = await gateway_factory(routes(servers))
    expected = {"name": "output-0", "shape": [2], "datatype": "INT64", "data": [0, 2],
                "numpy_shape": [2]}  # fmt: skip
    calls: list[dict[str, Any]] = []
    for form in ("host", "path"):
        where = {"protocol": "v2", "model": "iris", **at(gw, "iris", form)}
        calls += [
            {**where, "op": "is_server_live"},
            {**where, "op": "is_server_ready"},
            {**where, "op": "is_model_ready"},
            {**where, "op": "infer", "inputs": v2_inputs(), "id": f"req-{form}"},
            # set_data_from_numpy's default: the binary tensor data extension.
            {**where, "op": "infer", "inputs": v2_inputs("FP64", binary=True)},
            {**where, "op": "infer", "inputs": v2_inputs(),
             "parameters": {"binary_data_output": True}},
        ]  # fmt: skip
    host = {"protocol": "v2", "model": "iris", **at(gw, "iris", "host")}
    calls += [
        {**host, "op": "is_model_ready", "model": "no-such-model"},
        # Nested data is V2 too.
        {**host, "op": "infer", "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                           "data": IRIS, "as_given": True}]},
        {**host, "op": "infer", "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32",
                                           "data": FLAT, "as_given": True}]},
        {**host, "op": "infer", "inputs": [{"name": "x", "shape": [8], "datatype": "FP32",
                                           "data": FLAT}]},
    ]  # fmt: skip
    results = await run_kserve(kserve_python, calls)
    for i, form in enumerate(("host", "path")):
        live, ready, model_ready, plain, binary_in, binary_out = results[6 * i : 6 * i + 6]
        assert live == {"value": True}
        assert ready == {"value": True}
        assert model_ready == {"value": True}
        for r in (plain, binary_in, binary_out):
            assert r["value"]["model_name"] == "iris", r
            assert r["value"]["outputs"] == [expected], r
            assert r["version"] in {"1", "2"}
        assert plain["value"]["id"] == f"req-{form}"
    missing, nested, wrong_shape, one_row = results[12:]
    assert missing == {"value": False}
    assert nested["value"]["outputs"] == [expected]
    assert wrong_shape["status"] == 400 and "shape [2, 3] holds 6 values" in wrong_shape["error"]
    assert one_row["status"] == 400 and "list of features" in one_row["error"]


async def test_kserve_v2_client_pyfunc_through_the_stable_url(
    kserve_python: Path, servers: dict[str, ModelServer], gateway_factory: Any
) -> None:
    gw = await gateway_factory(routes(servers))
    where = {"model": "names", **at(gw, "names", "host")}
    calls = [
        {**where, "protocol": "v2", "op": "is_model_ready"},
        {**where, "protocol": "v2", "op": "infer", "inputs": v2_inputs()},
        {**where, "protocol": "v2", "op": "infer", "inputs": v2_inputs(binary=True),
         "outputs": [{"name": "species", "parameters": {"binary_data": True}}]},
        {**where, "protocol": "v1", "op": "infer", "data": {"instances": IRIS}},
        {**where, "protocol": "v1", "op": "is_server_live"},
    ]  # fmt: skip
    results = await run_kserve(kserve_python, calls)
    ready, both, species, v1, live = results
    assert ready == {"value": True}
    # The class's {"predictions": [{"species", "probability"}, ...]}: one output per key.
    species_out, probability_out = both["value"]["outputs"]
    assert species_out == {"name": "species", "shape": [2], "datatype": "BYTES",
                           "data": ["setosa", "virginica"], "numpy_shape": [2]}  # fmt: skip
    assert probability_out["name"] == "probability"
    assert probability_out["datatype"] == "FP64" and probability_out["shape"] == [2]
    assert all(0.5 < p <= 1 for p in probability_out["data"])
    assert species["value"]["outputs"] == [species_out]
    assert [p["species"] for p in v1["value"]["predictions"]] == ["setosa", "virginica"]
    assert live == {"value": True}


async def test_v2_server_paths_through_the_stable_url(
    servers: dict[str, ModelServer], gateway_factory: Any
) -> None:
    """What KServe's REST client has no call for: metadata, and a V2 error body."""
    gw = await gateway_factory(routes(servers))
    host = "iris.demo.localhost"
    async with gw.request("GET", host, "/v2/models/iris") as resp:
        assert resp.status == 200
        assert await resp.json() == {"name": "iris", "platform": "", "inputs": [], "outputs": []}
    async with gw.request("GET", "127.0.0.1", "/serving/demo/iris/v2/models/iris?x=1") as resp:
        assert (await resp.json())["name"] == "iris"
    async with gw.request("GET", host, "/v2") as resp:
        server = await resp.json()
        assert server["name"] == "merlin-dataplane" and "binary_tensor_data" in server["extensions"]
    async with gw.request("GET", host, "/v1/models/iris") as resp:
        assert (await resp.json())["name"] in {"iris-1", "iris-2"}  # the chosen version
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "INT8", "data": FLAT}]}
    async with gw.request("POST", host, "/v2/models/iris/infer", json=body) as resp:
        assert resp.status == 400
        assert "not INT8" in (await resp.json())["error"]
    # A version endpoint answers under its own full name only.
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": FLAT}]}
    async with gw.request("POST", "iris-2.demo.localhost", "/v2/models/iris-2/infer",
                          data=json.dumps(body)) as resp:  # fmt: skip
        assert resp.headers["X-Model-Version"] == "2"
        assert (await resp.json())["outputs"][0]["data"] == [0, 2]


async def test_v2_answers_of_two_versions_compare_equal_under_a_mirror(
    servers: dict[str, ModelServer], gateway_factory: Any
) -> None:
    """A V2 answer names the stable model, not the version: a shadow copy's answer from
    another version agrees when its predictions do (both iris versions say [0, 2])."""
    spec = routes(servers)
    spec["model_endpoints"][0] = model_endpoint(
        "demo", "iris", {"1": 100, "2": 0}, mirror={"version": "2", "percent": 100}
    )
    gw = await gateway_factory(spec)
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": FLAT}]}
    for n in range(10):
        request = {**body, "id": f"r{n}"} if n % 2 else body
        async with gw.request("POST", "iris.demo.localhost", "/v2/models/iris/infer",
                              data=json.dumps(request)) as resp:  # fmt: skip
            assert resp.status == 200 and resp.headers["X-Model-Version"] == "1"
            assert (await resp.json())["outputs"][0]["data"] == [0, 2]
    shadow = await wait_compared(gw, 10)
    assert shadow["compared"] == 10 and shadow["mismatch"] == {}
