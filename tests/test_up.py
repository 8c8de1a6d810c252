"""`merlin-dp up --demo` end to end, and the shipped model servers behind a gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from merlin_dp.common.net import free_port
from tests.conftest import ROOT
from tests.test_controller_api import BASE, Api

IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def listening_pids(ports: list[int]) -> set[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if any(f":{p} " in line for p in ports)}


def test_up_demo_serves_splits_and_stops_clean(tmp_path: Path) -> None:
    ports = [free_port(), free_port(), free_port()]
    log = (tmp_path / "up.log").open("w")
    up = subprocess.Popen(
        [sys.executable, "-m", "merlin_dp", "up", "--demo",
         "--state-dir", str(tmp_path / "s"),
         "--listen", f"127.0.0.1:{ports[0]}", "--admin", f"127.0.0.1:{ports[1]}",
         "--api", f"127.0.0.1:{ports[2]}", "--grpc-port", "0"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while "merlin-dp is up." not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        banner = (tmp_path / "up.log").read_text()
        url = f"http://iris.demo.localhost:{ports[0]}/v1/predict"
        assert url in banner
        assert "UPI (gRPC):  <model>.<project>.localhost:" in banner
        seen: dict[str, int] = {}
        for _ in range(200):
            out = subprocess.run(
                ["curl", "-s", "-D", "-", "--resolve", f"iris.demo.localhost:{ports[0]}:127.0.0.1",
                 url, "-d", json.dumps({"instances": IRIS})],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            head, _, body = out.stdout.partition("\n\n")  # text mode: CRLF became LF
            assert body, (out.stdout, out.stderr, out.returncode)
            assert json.loads(body) == {"predictions": [0, 2]}
            version = next(h.split(":")[1].strip() for h in head.split("\n")
                           if h.lower().startswith("x-model-version"))  # fmt: skip
            seen[version] = seen.get(version, 0) + 1
        assert set(seen) == {"1", "2"} and seen["1"] > seen["2"]
        pgrep = ["pgrep", "-f", "merlin_dp.servers.sklearn"]
        replica_pids = [
            int(p) for p in subprocess.run(pgrep, capture_output=True, text=True).stdout.split()
        ]
        assert replica_pids
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
        log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    assert listening_pids(ports) == set()
    for pid in replica_pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )


async def test_pyfunc_and_sklearn_servers_through_the_gateway(tmp_path: Path) -> None:
    from merlin_dp.controller.server import ControllerConfig, start_controller
    from merlin_dp.gateway.config import GatewayConfig
    from merlin_dp.gateway.routing.sources import ControllerRouteSource
    from merlin_dp.gateway.worker import GatewayWorker

    sys.path.insert(0, str(ROOT / "examples" / "iris"))
    from train import train  # type: ignore[import-not-found]

    models = tmp_path / "models"
    await asyncio.to_thread(train, models)
    # The pyfunc example: its code beside the artifact in one model directory.
    (models / "v1" / "iris_names.py").write_text(
        (ROOT / "examples/pyfunc/iris_names.py").read_text()
    )
    controller, runner, port = await start_controller(
        ControllerConfig(state_dir=tmp_path / "state", port=0, drain_seconds=0.2)
    )
    api = Api(f"http://127.0.0.1:{port}")
    worker = GatewayWorker(GatewayConfig(port=0), ControllerRouteSource(api.url))
    await worker.start()
    try:
        deployments: dict[str, dict[str, Any]] = {
            "1": {"type": "pyfunc", "model_dir": str(models / "v1"),
                  "pyfunc_class": "iris_names:IrisWithNames"},
            "2": {"type": "sklearn", "model_dir": str(models / "v2")},
        }  # fmt: skip
        for v, spec in deployments.items():
            status, body, _ = await api.call("PUT", f"{BASE}/versions/{v}/endpoint", spec)
            assert status == 202, body
        for v in deployments:
            await api.wait_status(v, "running")
        await api.call("PUT", f"{BASE}/endpoint", {"rule": {
            "destinations": [{"version": "1", "weight": 100}],
            "match": [{"header": "X-Model-Version", "exact": "2", "version": "2"}]}})  # fmt: skip
        for _ in range(100):
            if worker.proxy.table.revision == controller.state.revision:
                break
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{worker.port}/v1/predict"
        async with aiohttp.ClientSession() as s:
            headers = {"Host": "scorer.fraud.localhost"}
            async with s.post(url, json={"instances": IRIS}, headers=headers) as r:
                body = await r.json()
                assert r.status == 200, body
                assert [p["species"] for p in body["predictions"]] == ["setosa", "virginica"]
            async with s.post(url, json={"instances": IRIS},
                              headers={**headers, "X-Model-Version": "2"}) as r:  # fmt: skip
                assert await r.json() == {"predictions": [0, 2]}
            async with s.post(url, json={"instances": [[1, 2]]}, headers=headers) as r:
                assert r.status == 400 and "instances" in (await r.json())["error"]
            async with s.post(url, data=b"not json", headers=headers) as r:
                assert r.status == 400
    finally:
        await worker.stop()
        await api.session.close()
        await runner.cleanup()
        await controller.close()
