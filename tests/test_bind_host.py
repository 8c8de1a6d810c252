"""Where the shipped model servers listen: loopback for the local runtime, every
interface when the replica contract's ``CARAML_BIND_HOST`` says so (a pod)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from merlin_dp.common.net import free_port
from tests.conftest import ROOT

MODEL = """
class Echo:
    def load(self):
        pass

    def predict(self, payload):
        return payload
"""


def reachable(url: str, timeout: float = 15.0) -> bool:
    """Whether ``url`` answers before ``timeout`` (False once the server is surely up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    return False


@pytest.mark.parametrize("server", ["pyfunc", "upi"])
@pytest.mark.parametrize("bind", ["", "0.0.0.0"])
def test_bind_host(tmp_path: Path, server: str, bind: str) -> None:
    (tmp_path / "echo.py").write_text(MODEL)
    http_port = free_port()
    env = {
        **os.environ,
        "CARAML_HTTP_PORT": str(http_port),
        "CARAML_MODEL_NAME": "echo",
        "CARAML_MODEL_VERSION": "1",
        "CARAML_MODEL_FULL_NAME": "echo-1",
        "CARAML_ARTIFACT_LOCATION": str(tmp_path),
        "CARAML_BIND_HOST": bind,
    }
    model = "echo:Echo"
    if server == "upi":
        env["CARAML_GRPC_PORT"] = str(free_port())
        env["CARAML_ARTIFACT_LOCATION"] = str(ROOT / "examples" / "upi")
        model = "row_scorer:RowScorer"
    proc = subprocess.Popen([sys.executable, "-m", f"merlin_dp.servers.{server}", model],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert reachable(f"http://127.0.0.1:{http_port}/")
        # 127.0.0.2 is loopback too, but only a server on every interface answers there.
        other = reachable(f"http://127.0.0.2:{http_port}/", timeout=1.0)
        assert other == (bind == "0.0.0.0")
    finally:
        proc.terminate()
        proc.wait(10)
