"""The controller as a real process: the CLI against it, kill -9 and restart, and a
gateway that keeps serving while the controller is away."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from merlin_dp.common.net import free_port
from tests.conftest import ROOT, Proc, RedisServer, wait_port

EXAMPLE = f"{sys.executable} {ROOT / 'examples' / 'custom_model.py'}"


def start_controller(tmp: Path, state: Path, port: int, *extra: str) -> Proc:
    proc = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}", *extra],
        port, tmp / f"controller-{port}-{len(list(tmp.glob('controller-*')))}.log",
    )  # fmt: skip
    wait_port(port)
    return proc


# `python -m merlin_dp`'s main() on the arguments that come as a JSON line on stdin (none:
# exit). Started ahead, the interpreter is up and the command's modules imported by then.
HELD_CLI = ("import json, sys; from merlin_dp.cli.main import main; line = sys.stdin.readline(); "
            "sys.exit(main(json.loads(line)) if line else 0)")  # fmt: skip
_held: list[tuple[subprocess.Popen[str], dict[str, str]]] = []  # with the environment it got


def _start_held() -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_CLI], cwd=ROOT, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    return proc, dict(os.environ)


@atexit.register
def _end_held() -> None:
    while _held:
        _held.pop()[0].communicate("", timeout=10)


def run_cli(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`merlin-dp ARGV` from the checkout, as a process of its own; the next one's Python
    starts as this one runs (Python and the CLI's imports cost ~0.6 s a command)."""
    proc, env = _held.pop() if _held else _start_held()
    if env != dict(os.environ):  # started before the environment changed: not this one
        proc.communicate("", timeout=10)
        proc, env = _start_held()
    _held.append(_start_held())
    try:
        out, err = proc.communicate(json.dumps(argv) + "\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(["merlin-dp", *argv], proc.returncode, out, err)


def cli(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli([*args, "--controller", f"http://127.0.0.1:{port}"])


def test_cli_drives_the_controller(tmp_path: Path) -> None:
    port = free_port()
    ctl = start_controller(tmp_path, tmp_path / "state", port)
    try:
        for v in ("1", "2"):
            out = cli(port, "deploy", f"fraud/scorer/{v}", "--command", EXAMPLE, "--wait", "30")
            assert out.returncode == 0, out.stderr
            assert f"fraud/scorer/{v}: running  http://scorer-{v}.fraud.localhost" in out.stdout
        rule = ["--weights", "1=90,2=10", "--match", "X-Tenant~^beta-:2",
                "--sticky", "header:X-User", "--mirror", "2:0.5"]  # fmt: skip
        out = cli(port, "route", "fraud/scorer", *rule)
        assert out.returncode == 0, out.stderr
        assert (
            "1=90% 2=10%; match X-Tenant~^beta- -> 2; sticky header X-User; mirror 0.5% -> 2"
            in out.stdout
        )
        status = cli(port, "status", "fraud/scorer")
        assert "http://scorer.fraud.localhost" in status.stdout
        assert "serving" in status.stdout
        versions = json.loads(cli(port, "versions", "fraud/scorer", "-o", "json").stdout)
        assert {v["status"] for v in versions["versions"]} == {"serving"}
        assert "2=100%" in cli(port, "switch", "fraud/scorer").stdout
        assert "1=90% 2=10%" in cli(port, "rollback", "fraud/scorer").stdout
        history = cli(port, "history", "fraud/scorer")
        assert history.stdout.count("\n") >= 3
        # API errors come back as the API states them, exit code 1.
        refused = cli(port, "undeploy", "fraud/scorer/1")
        assert refused.returncode == 1
        assert "409 conflict: version endpoint fraud/scorer/1 is serving" in refused.stderr
        bad = cli(port, "route", "fraud/scorer", "--weights", "1=50")
        assert bad.returncode == 1 and "422 invalid" in bad.stderr and "sum to 100" in bad.stderr
        assert cli(port + 1, "versions", "fraud/scorer").returncode == 1
    finally:
        ctl.stop()


async def test_state_survives_kill_9_and_gateway_rides_it_out(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    ctl = start_controller(tmp_path, state, port)
    gw_port, admin = free_port(), free_port()
    gateway = Proc(
        [sys.executable, "-m", "merlin_dp", "gateway", "--controller",
         f"http://127.0.0.1:{port}", "--listen", f"127.0.0.1:{gw_port}",
         "--admin", f"127.0.0.1:{admin}"],
        gw_port, tmp_path / "gateway.log",
    )  # fmt: skip
    wait_port(gw_port)
    base = f"http://127.0.0.1:{port}/v1/projects/fraud/models/scorer"
    headers = {"Host": "scorer.fraud.localhost"}
    try:
        assert (
            cli(port, "deploy", "fraud/scorer/1", "--command", EXAMPLE, "--wait", "30").returncode
            == 0
        )
        assert cli(port, "route", "fraud/scorer", "--weights", "1=100").returncode == 0
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/endpoint") as r:
                before: dict[str, Any] = await r.json()

            async def predict() -> int:
                async with s.post(f"http://127.0.0.1:{gw_port}/v1/predict",
                                  json={"instances": [[1]]}, headers=headers) as r:  # fmt: skip
                    await r.read()
                    return r.status

            for _ in range(100):
                if await predict() == 200:
                    break
                await asyncio.sleep(0.05)
            # kill -9 the controller: its replicas are orphaned with it, but the gateway
            # keeps its last good table and says it lost the source.
            ctl.kill(signal.SIGKILL)
            ctl.popen.wait(5)
            for _ in range(100):
                async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                    ready = await r.json()
                if not ready["workers"][0]["source_connected"]:
                    break
                await asyncio.sleep(0.05)
            assert ready["ready"] and not ready["workers"][0]["source_connected"]
            assert await predict() == 200  # replicas outlived the controller's SIGKILL
            # Restart on the same state: the rule is intact, versions come back running.
            ctl = start_controller(tmp_path, state, port)
            async with s.get(f"{base}/endpoint") as r:
                after = await r.json()
            assert after["rule"] == before["rule"] and after["revision"] >= before["revision"]
            for _ in range(300):
                async with s.get(f"{base}/versions/1/endpoint") as r:
                    v1 = await r.json()
                if v1["status"] == "serving" and v1["replicas"]:
                    break
                await asyncio.sleep(0.1)
            assert v1["status"] == "serving" and v1["replicas"]
            for _ in range(100):
                async with s.get(f"http://127.0.0.1:{admin}/readyz") as r:
                    ready = await r.json()
                if ready["workers"][0]["source_connected"]:
                    break
                await asyncio.sleep(0.1)
            assert ready["workers"][0]["source_connected"]
            for _ in range(100):
                if await predict() == 200:
                    break
                await asyncio.sleep(0.1)
            assert await predict() == 200
        # The orphans of the killed controller were reaped at restart: only one replica runs.
        log = tmp_path.glob("controller-*.log")
        assert any("left running by an earlier run" in p.read_text() for p in log)
    finally:
        gateway.stop()
        ctl.stop()


def test_kill_9_mid_change_leaves_a_whole_state(tmp_path: Path) -> None:
    """Writers hammer the controller; it is SIGKILLed mid-stream. After a restart the
    state is one of the accepted ones, whole: never torn, never a half-applied change."""
    import threading
    import urllib.request

    port = free_port()
    state = tmp_path / "state"
    ctl = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}", "--runtime", "none"],
        port, tmp_path / "controller-a.log",
    )  # fmt: skip
    wait_port(port)
    base = f"http://127.0.0.1:{port}/v1/projects/fraud/models/scorer"
    accepted: list[int] = []
    stop = threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            body = json.dumps({"type": "custom", "command": ["serve", f"{n}-{i}"]}).encode()
            req = urllib.request.Request(f"{base}/versions/{n}/endpoint", data=body, method="PUT")
            req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    accepted.append(json.loads(resp.read())["generation"])
            except Exception:  # 409 while pending, or the controller just died
                # A pending version can't be changed: make it pending again by undeploy.
                with contextlib.suppress(Exception):
                    urllib.request.urlopen(urllib.request.Request(
                        f"{base}/versions/{n}/endpoint", method="DELETE"), timeout=5)  # fmt: skip

    threads = [threading.Thread(target=writer, args=(str(n),)) for n in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    ctl.kill(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(10)
    ctl.popen.wait(5)
    assert len(accepted) > 5
    raw = (state / "state.json").read_text()
    restarted = start_controller(tmp_path, state, port)
    try:
        doc = json.loads(raw)  # whole JSON: the atomic replace never left a torn file
        with urllib.request.urlopen(f"{base}/versions", timeout=5) as resp:
            versions = json.loads(resp.read())["versions"]
        assert {v["version"] for v in versions} <= {"1", "2"}
        assert doc["revision"] >= 1
        for v in versions:
            assert v["spec"]["command"][0] == "serve"  # each record whole and valid
    finally:
        restarted.stop()


@pytest.mark.parametrize("signals", ["admin", "redis"])
async def test_processes_scale_to_zero_and_activate(tmp_path: Path, signals: str) -> None:
    """`merlin-dp controller` runs the autoscaler on signals pulled from the gateway's admin
    port (`--gateway-admin`) or pushed through Redis (`--redis-signals`); a two-worker
    gateway process holds the first request at zero and every worker pokes the controller."""
    port, gw_port, admin = free_port(), free_port(), free_port()
    if signals == "admin":
        source = ["--gateway-admin", f"http://127.0.0.1:{admin}"]
        follow = ["--controller", f"http://127.0.0.1:{port}"]
    else:
        redis = RedisServer(tmp_path)
        redis.start()
        source = ["--store", redis.url, "--redis-signals"]
        follow = ["--redis", redis.url, "--activate-url", f"http://127.0.0.1:{port}"]
    ctl = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir",
         str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}", *source,
         "--stable-window", "3", "--scale-down-delay", "1", "--scale-to-zero-grace", "1"],
        port, tmp_path / "controller.log",
    )  # fmt: skip
    wait_port(port)
    gateway = Proc(
        [sys.executable, "-m", "merlin_dp", "gateway", *follow, "--listen",
         f"127.0.0.1:{gw_port}", "--admin", f"127.0.0.1:{admin}", "--workers", "2"],
        gw_port, tmp_path / "gateway.log",
    )  # fmt: skip
    wait_port(gw_port)
    base = f"http://127.0.0.1:{port}/v1/projects/fraud/models/scorer"
    try:
        out = cli(port, "deploy", "fraud/scorer/1", "--command", EXAMPLE, "--min-replica", "0",
                  "--wait", "30")  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert cli(port, "route", "fraud/scorer", "--weights", "1=100").returncode == 0
        async with aiohttp.ClientSession() as s:
            for _ in range(300):  # idle: the autoscaler takes it to zero
                async with s.get(f"{base}/versions/1/endpoint") as r:
                    v1 = await r.json()
                if v1["status"] == "serving" and not v1["replicas"]:
                    break
                await asyncio.sleep(0.1)
            assert v1["replicas"] == [], v1

            # Several requests at zero, spread over both workers: all answered.
            async def predict() -> int:
                async with s.post(f"http://127.0.0.1:{gw_port}/v1/predict",
                                  json={"instances": [[1]]},
                                  headers={"Host": "scorer.fraud.localhost"}) as r:  # fmt: skip
                    await r.read()
                    return r.status

            assert await asyncio.gather(*(predict() for _ in range(8))) == [200] * 8
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                scaler_text = await r.text()
        cold = [ln for ln in text.splitlines() if ln.startswith("gateway_cold_start_seconds_count")]
        assert cold and sum(float(ln.rsplit(" ", 1)[1]) for ln in cold) >= 1
        assert "merlin_autoscaler_activations_total" in scaler_text
    finally:
        gateway.stop()
        ctl.stop()
        if signals == "redis":
            redis.kill()
