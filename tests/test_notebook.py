"""examples/notebook.ipynb, executed headless as a user would run it: a real Jupyter
kernel (ipykernel) driven by nbclient, against a real `merlin-dp up`.

The notebook defines a model in a cell, deploys two versions, predicts, shadows,
canaries 90/10, switches and rolls back, and prints the status. This test reads its
outputs and the controller's state afterwards, through the SDK.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from merlin_dp.sdk import Client
from tests.conftest import ROOT, Up

NOTEBOOK = ROOT / "examples" / "notebook.ipynb"


def outputs(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream"
    )


def test_the_notebook_runs_top_to_bottom_against_merlin_dp_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Up(tmp_path, tmp_path / "state")
    try:
        up.wait_up()
        # How a user points the notebook at their `merlin-dp up` (its default is :8090).
        monkeypatch.setenv("MERLIN_DP_CONTROLLER", up.api)
        notebook = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
            "the committed notebook carries outputs"
        )
        # The kernel runs in a scratch directory: the notebook's files (the estimators,
        # the packages under .merlin-dp/) land there.
        NotebookClient(notebook, timeout=180, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
        code = [c for c in notebook.cells if c.cell_type == "code"]
        text = "\n".join(outputs(c) for c in code)
        assert "Traceback" not in text, text

        deployed = outputs(code[2])
        assert deployed.count("running http://iris-") == 2, deployed
        first = outputs(code[3])
        assert "['setosa', 'versicolor', 'virginica']} served by version 1" in first, first
        shadow = outputs(code[4])
        assert "version='2' percent=100.0" in shadow and "served by: {'1': 50}" in shadow, shadow
        canary = re.search(r"served by: \{'1': (\d+), '2': (\d+)\}", outputs(code[5]))
        assert canary is not None, outputs(code[5])
        to_one, to_two = map(int, canary.groups())
        assert to_one + to_two == 300 and 10 <= to_two <= 60, (to_one, to_two)
        switched = outputs(code[6])
        assert "weight=100)] 2\n" in switched, switched
        status = outputs(code[7])
        assert "1=90% 2=10%" in status and status.count("serving") == 2, status

        # What the notebook left is what the controller has.
        client = Client(up.api)
        endpoint = client.endpoint("notebook/iris")
        assert [(d.version, d.weight) for d in endpoint.rule.destinations] == [("1", 90), ("2", 10)]
        assert endpoint.rule.mirror is None
        assert [v.status for v in client.versions("notebook/iris")] == ["serving", "serving"]
        packages = sorted((tmp_path / ".merlin-dp" / "packages").iterdir())
        assert len(packages) == 2, packages
        assert all((p / "artifacts" / "model").is_dir() for p in packages)
    finally:
        up.stop()
    assert "Traceback" not in up.log.read_text(), up.log.read_text()[-4000:]
