"""A class written for Merlin's PyFunc contract runs unchanged as a version endpoint
here, in the published merlin-pyfunc-server and in this project's pyfunc server alike.

One model file, written as a Merlin user writes it (``from merlin.pyfunc import
PyFuncModel``, an artifact read in ``initialize``, the request's headers read in
``infer``), is served twice behind one stable URL:

- version 1: merlin-sdk 0.50.0 saves it as MLflow does for ``log_pyfunc_model``, and
  the published merlin-pyfunc-server 0.50.0 (``python -m pyfuncserver``, unmodified,
  in its own Python 3.10 venv, ``tests/clients.py``) serves that directory under the
  replica contract the local runtime sets (``CARAML_HTTP_PORT``, the model's names,
  readiness at ``/v1/models/<full name>``);
- version 2: this project's pyfunc server serves the same file from a plain directory
  (``artifacts/weights.json``), with merlin-sdk absent and ``import merlin`` resolved
  to its stand-in (``merlin_dp.servers.merlin_contract``).

Split 50/50, every answer through the gateway equals the one computed here, whichever
version gave it, and carries the header the caller sent; mirrored from one version to
the other, the gateway compares the pairs and counts no mismatch.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from merlin_dp.sdk import Client
from tests import clients
from tests.conftest import Up, running_up

merlin_python = clients.merlin_python  # the session fixture: the published Merlin venv

# Under a neighbour's CPU load, 15 of the 20 shadow copies were compared within the
# test's 10 s (one run on two workers). The test command runs these alone.
pytestmark = pytest.mark.alone

MODEL = "merlin/published"
CLASS = "Affine"
WEIGHTS = {"scale": 0.5, "bias": 1.25}
TENANT = "acme"

# Written for Merlin, and nothing else: the base class comes from merlin-sdk where it is
# installed (version 1) and from this project's stand-in where it isn't (version 2).
MODEL_FILE = f"""\
import json

from merlin.pyfunc import PyFuncModel


class {CLASS}(PyFuncModel):
    def initialize(self, artifacts):
        with open(artifacts["weights"]) as f:
            self.weights = json.load(f)

    def infer(self, request, **kwargs):
        w = self.weights
        return {{
            "predictions": [w["scale"] * x + w["bias"] for x in request["instances"]],
            "tenant": kwargs["headers"].get("X-Tenant"),
        }}
"""

# What merlin-sdk's Model.log_pyfunc_model does, saved to a directory instead of logged
# to a tracking server: mlflow.pyfunc with the instance, its artifacts and its code.
SAVE = """\
import sys

model_file, weights, out, class_name = sys.argv[1:]
sys.path.insert(0, model_file.rpartition("/")[0])
import mlflow.pyfunc
import merlin_model

mlflow.pyfunc.save_model(
    out,
    python_model=getattr(merlin_model, class_name)(),
    artifacts={"weights": weights},
    code_path=[model_file],
)
"""


def expected(instances: list[float]) -> dict[str, Any]:
    """The answer either version must give, computed here."""
    return {
        "predictions": [WEIGHTS["scale"] * x + WEIGHTS["bias"] for x in instances],
        "tenant": TENANT,
    }


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running_up(tmp_path_factory.mktemp("merlin")) as server:
        yield server


def shadow_counts(admin_port: int, version: str) -> tuple[float, float]:
    """(compared, mismatched) mirrored answers of ``version``, from the gateway's
    admin /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    project, model = MODEL.split("/")
    counts = {"gateway_shadow_compared_total": 0.0, "gateway_shadow_mismatch_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            mine = (sample.labels.get("project"), sample.labels.get("model"),
                    sample.labels.get("version")) == (project, model, version)  # fmt: skip
            if mine and sample.name in counts:
                counts[sample.name] += sample.value
    return counts["gateway_shadow_compared_total"], counts["gateway_shadow_mismatch_total"]


# The suite's 120 s bound covers setup too, and setup may be making the venv: about 50 s
# on a new machine with 2 cores, slower niced beside other tests.
@pytest.mark.timeout(300)
def test_a_merlin_class_runs_unchanged_in_the_published_server_and_here(
    up: Up, merlin_python: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps(WEIGHTS))
    source = tmp_path / "src"
    source.mkdir()
    model_file = source / "merlin_model.py"
    model_file.write_text(MODEL_FILE)

    # 1. merlin-sdk's MLflow directory, made in the 3.10 venv. mlflow and merlin import
    # in about 6 s: it runs while version 2 deploys.
    mlflow_dir = tmp_path / "mlflow-model"
    save = subprocess.Popen(
        [str(merlin_python), "-c", SAVE, str(model_file), str(weights), str(mlflow_dir), CLASS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clients.client_environ(),
        cwd=tmp_path,
    )  # fmt: skip

    # 3. This project's pyfunc server, from a plain directory with the same file.
    plain = tmp_path / "plain"
    (plain / "artifacts").mkdir(parents=True)
    (plain / "merlin_model.py").write_text(MODEL_FILE)
    (plain / "artifacts" / "weights.json").write_text(json.dumps(WEIGHTS))
    client = Client(up.api)
    v2 = client.deploy(f"{MODEL}/2", model_dir=plain, pyfunc_class=f"merlin_model:{CLASS}",
                       wait=60)  # fmt: skip
    assert v2.status == "running"

    out, _ = save.communicate(timeout=60)
    assert save.returncode == 0, out.decode(errors="replace")
    assert (mlflow_dir / "MLmodel").exists() and (mlflow_dir / "code" / "merlin_model.py").exists()

    # 2. The published server, unchanged, under the replica contract. It needs
    # PROMETHEUS_MULTIPROC_DIR to be a directory (Merlin's image sets it). In HTTP_JSON
    # mode it starts no gRPC server, so its CARAML_GRPC_PORT default (9000) can't clash;
    # it binds every interface, where the runtime probes 127.0.0.1.
    prometheus = tmp_path / "prometheus"
    prometheus.mkdir()
    v1 = client.deploy(
        f"{MODEL}/1",
        command=[str(merlin_python), "-m", "pyfuncserver", "--model_dir", str(mlflow_dir)],
        workdir=tmp_path,
        env={"PROMETHEUS_MULTIPROC_DIR": str(prometheus)},
        wait=60,  # mlflow's import makes it ready in about 5 s
    )
    assert v1.status == "running"
    logs = "\n".join(line for entry in client.logs(f"{MODEL}/1").logs for line in entry.lines)
    assert "Registering model: name: published, version: 1" in logs, logs  # pyfuncserver's

    # 4. 50/50 through the stable URL: every answer is the one computed here, the header
    # reached infer in both, and the two versions' JSON is the same.
    client.route(MODEL, {"1": 50, "2": 50})
    answers: dict[str, set[str]] = {"1": set(), "2": set()}
    for i in range(40):
        instances = [float(i), i + 0.5]
        answer = client.predict(MODEL, {"instances": instances}, headers={"X-Tenant": TENANT})
        assert answer.result == expected(instances), (answer.version, answer.result)
        answers[answer.version].add(json.dumps(answer.result, sort_keys=True))
    assert answers["1"] and answers["2"], answers  # both versions answered
    same = [json.dumps(expected([1.0, 2.5]), sort_keys=True)]
    for version in ("1", "2"):
        direct = client.predict(MODEL, {"instances": [1.0, 2.5]}, version=version,
                                headers={"X-Tenant": TENANT})  # fmt: skip
        same.append(json.dumps(direct.result, sort_keys=True))
    assert len(set(same)) == 1, same

    # 5. The published server as primary, this one as its shadow: the gateway compares
    # each pair and finds no difference.
    client.route(MODEL, {"1": 100})
    client.set_mirror(MODEL, "2", 100)
    sent = 20
    for i in range(sent):
        answer = client.predict(MODEL, {"instances": [i]}, headers={"X-Tenant": TENANT})
        assert answer.version == "1" and answer.result == expected([i])
    deadline = time.monotonic() + 10  # shadow copies are compared after the answer
    while (counts := shadow_counts(up.admin, "2"))[0] < sent and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counts == (sent, 0), counts

    client.delete_endpoint(MODEL)
    for version in ("1", "2"):
        assert client.undeploy(f"{MODEL}/{version}").status == "terminated"
