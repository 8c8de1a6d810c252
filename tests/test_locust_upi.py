"""The gRPC Locust suite end to end: ``merlin-dp loadtest --suite upi`` against a gateway's
gRPC port in front of two real UPI replicas, split 50/50; then against a model endpoint
whose only version has no replica, so every call fails and is named by its status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from merlin_dp.common.net import free_port
from merlin_dp.loadtest.locust_common import read_summary, request_from_payload
from tests.conftest import ROOT, Procs, write_routes
from tests.test_grpc_gateway import spec, start_upi, wait_ready


def loadtest(gateway: str, out: Path, model: str = "fraud/scorer") -> str:
    done = subprocess.run(
        [sys.executable, "-m", "merlin_dp", "loadtest", model, "--suite", "upi",
         "--gateway", gateway, "--duration", "2", "--users", "4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_payload_becomes_a_table() -> None:
    req = request_from_payload(json.dumps({"instances": [[5.1, 3.5], [1.0]]}))
    table = req.prediction_table
    assert [c.name for c in table.columns] == ["f0", "f1"]
    assert [r.row_id for r in table.rows] == ["0", "1"]
    assert table.rows[0].values[1].double_value == 3.5 and table.rows[1].values[1].is_null


def test_loadtest_upi_suite_through_the_gateway(tmp_path: Path, procs: Procs) -> None:
    log = tmp_path / "replicas.log"
    replicas = {v: start_upi(v, log) for v in ("1", "2")}
    try:
        wait_ready(list(replicas.values()), log)
        routes = tmp_path / "routes.json"
        addresses = {v: [r.address] for v, r in replicas.items()}
        table = spec(1, {**addresses, "3": []}, {"1": 50, "2": 50})
        table["model_endpoints"].append(
            {"project": "fraud", "model": "empty", "protocol": "UPI_V1",
             "rule": {"destinations": [{"version": "3", "weight": 100}]}}
        )  # fmt: skip
        # Version 3 of fraud/scorer, with no replica, is also what fraud/empty routes to.
        table["version_endpoints"].append(
            {"project": "fraud", "model": "empty", "version": "3", "replicas": [],
             "protocol": "UPI_V1"}
        )  # fmt: skip
        write_routes(routes, table)
        grpc_port = free_port()
        procs.gateway(routes, "--grpc-port", str(grpc_port))
        gateway = f"http://127.0.0.1:{grpc_port}"

        text = loadtest(gateway, tmp_path / "ok")
        assert text.startswith("exit 0"), text
        summary = read_summary(tmp_path / "ok" / "upi")
        assert summary.requests > 0 and summary.failures == 0
        assert set(summary.answered_by) == {"1", "2"}
        assert "answered by  v1" in text and "errors       none" in text

        text = loadtest(gateway, tmp_path / "down", model="fraud/empty")
        assert text.startswith("exit 1"), text
        summary = read_summary(tmp_path / "down" / "upi")
        assert summary.failures == summary.requests > 0
        assert summary.errors == {"gRPC UNAVAILABLE": summary.failures}
    finally:
        for r in replicas.values():
            r.stop()
