"""What a newcomer tripped on (issue 14), each through the real `merlin-dp` CLI as a
subprocess against real `merlin-dp up` / `merlin-dp controller` processes and replicas:
a state directory in use, a taken port, a replica that exits at once, a relative
`--command` from another directory, `logs` and `status` from anywhere, model URLs."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from merlin_dp.common.net import free_port
from merlin_dp.protos.caraml.upi.v1 import upi_pb2_grpc
from tests.conftest import ROOT, Proc, Up, wait_port
from tests.test_controller_process import run_cli
from tests.test_upi_server import DOUBLE, make_table, request, scores

EXAMPLE = ROOT / "examples" / "custom_model.py"
SERVE = f"{sys.executable} {EXAMPLE}"
CRASH = f"{sys.executable} -c 'import sys; print(\"boom: no weights file\"); sys.exit(3)'"
SLEEPER = f"{sys.executable} -c 'import time; time.sleep(300)'"


def cli(api: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    argv = [*args, "--controller", api]
    if cwd == ROOT:  # a Python started ahead runs it (tests/test_controller_process.py)
        return run_cli(argv, timeout=120)
    return subprocess.run(
        [sys.executable, "-m", "merlin_dp", *argv],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def replica_pids(state: Path) -> set[int]:
    """The replicas a run recorded (pid files under the state directory)."""
    records = (state / "runtime" / "replicas").glob("*.json")
    return {json.loads(p.read_text())["pid"] for p in records}


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


# --- one process per state directory; a taken port -----------------------------------


def test_a_second_up_on_a_state_dir_in_use_is_refused_and_the_first_keeps_running(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = Up(tmp_path, state)
    try:
        first.wait_up()
        out = cli(first.api, "deploy", "fraud/scorer/1", "--command", SERVE,
                  "--min-replica", "2", "--max-replica", "2", "--wait", "60")  # fmt: skip
        assert out.returncode == 0, out.stderr
        pids = replica_pids(state)
        assert len(pids) == 2 and all(alive(p) for p in pids)

        second = Up(tmp_path, state, "second")
        second.proc.wait(60)
        second.stop()
        text = second.log.read_text()
        assert second.proc.returncode == 1, text
        refusal = f"the state directory {state.resolve()} is in use by pid {first.proc.pid} ("
        assert f"merlin-dp up: {refusal}" in text
        assert "-m merlin_dp up" in text and "Traceback" not in text
        assert not listening(second.api_port) and not listening(second.port)

        # `merlin-dp controller` on a file store takes the same lock.
        ctl = subprocess.run(
            [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(state),
             "--listen", f"127.0.0.1:{free_port()}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert f"is in use by pid {first.proc.pid}" in one_line_error(ctl)

        # The first one never noticed: same replicas, same records, still serving.
        assert first.proc.poll() is None
        assert replica_pids(state) == pids and all(alive(p) for p in pids)
        versions = json.loads(cli(first.api, "versions", "fraud/scorer", "-o", "json").stdout)
        [v1] = versions["versions"]
        assert v1["status"] == "running" and len(v1["replicas"]) == 2
    finally:
        first.stop()
    assert first.proc.returncode == 0, first.log.read_text()
    assert not any(alive(p) for p in pids)


def test_a_taken_port_is_one_line_and_nothing_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    marker = tmp_path / "marker_model.py"  # names this test's replicas in `ps`
    marker.write_text(EXAMPLE.read_text())
    port = free_port()
    ctl = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}"],
        port, tmp_path / "controller.log",
    )  # fmt: skip
    try:
        wait_port(port)
        out = cli(f"http://127.0.0.1:{port}", "deploy", "fraud/scorer/1", "--command",
                  f"{sys.executable} {marker}", "--wait", "60")  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        ctl.stop()
    # The state says version 1 runs: a start on this directory would start its replica.
    logs = set((state / "runtime" / "logs").iterdir())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(state),
             "--listen", f"127.0.0.1:{busy}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        line = one_line_error(out)
        assert line.startswith(f"merlin-dp controller: cannot listen on 127.0.0.1:{busy} ")
        assert "Address already in use" in line
        for flag in ("--listen", "--admin", "--grpc-port"):
            ports = {"--listen": f"127.0.0.1:{free_port()}", "--admin": f"127.0.0.1:{free_port()}",
                     "--grpc-port": str(free_port())}  # fmt: skip
            ports[flag] = str(busy) if flag == "--grpc-port" else f"127.0.0.1:{busy}"
            out = subprocess.run(
                [sys.executable, "-m", "merlin_dp", "up", "--state-dir", str(state),
                 "--api", f"127.0.0.1:{free_port()}", *(x for kv in ports.items() for x in kv)],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            line = one_line_error(out)
            assert f"cannot listen on 127.0.0.1:{busy} for " in line and f"({flag})" in line
    # No replica was started, not even for a moment: no new log file, no process.
    assert set((state / "runtime" / "logs").iterdir()) == logs
    running = [p for p in Path("/proc").iterdir() if p.name.isdigit() and alive(int(p.name))
               and str(marker) in _cmdline(p)]  # fmt: skip
    assert running == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- a replica that exits at once ------------------------------------------------------


def test_a_crash_loop_fails_fast_and_says_why_everywhere(tmp_path: Path) -> None:
    port = free_port()
    ctl = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir",
         str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}",
         "--public-http-port", "80", "--public-grpc-port", "0"],
        port, tmp_path / "controller.log",
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    try:
        wait_port(port)
        # The ready deadline stays at its default (120 s), past the wait: only failing
        # fast can answer within it.
        out = cli(api, "deploy", "fraud/bad/1", "--command", CRASH, "--wait", "60")
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert out.stderr.startswith("merlin-dp: fraud/bad/1 failed: crash loop: ")
        assert "exit code 3" in out.stderr and "boom: no weights file" in out.stderr
        for command in ("versions", "status"):
            shown = cli(api, command, "fraud/bad")
            assert shown.returncode == 0, shown.stderr
            assert "failed" in shown.stdout and "exit code 3" in shown.stdout
            assert "    boom: no weights file" in shown.stdout  # the log tail, in the table view
            # A standalone controller's URLs follow --public-http-port (80: no port).
            assert "HTTP_JSON  http://bad-1.fraud.localhost\n" in shown.stdout
        [bad] = json.loads(cli(api, "versions", "fraud/bad", "-o", "json").stdout)["versions"]
        assert bad["status"] == "failed" and bad["url"] == "http://bad-1.fraud.localhost"
        assert bad["spec"]["ready_deadline_seconds"] == 120

        # Never ready but not crashing: --wait gives up and says it is still pending...
        out = cli(api, "deploy", "fraud/slow/1", "--command", SLEEPER, "--wait", "1")
        assert out.returncode == 1
        assert "merlin-dp: fraud/slow/1 is still pending after 1 s" in out.stderr
        # ...and --ready-deadline (carried to the runtime) fails it when it runs out.
        out = cli(api, "deploy", "fraud/late/1", "--command", SLEEPER, "--ready-deadline", "1",
                  "--wait", "60", "-o", "json")  # fmt: skip
        assert out.returncode == 1
        assert json.loads(out.stdout)["status"] == "failed"
        assert "no replica became ready within 1 s" in out.stderr
    finally:
        ctl.stop()


# --- where things run, and where the CLI may be run from -------------------------------


def test_a_relative_command_runs_where_it_was_deployed_from_and_logs_reach_anywhere(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"  # the user's project folder, not the controller's
    app.mkdir()
    (app / "greeting.txt").write_text("hello from the app folder\n")
    (app / "serve.py").write_text(
        "import runpy\n"
        "print('greeting:', open('greeting.txt').read().strip(), flush=True)\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    state = tmp_path / "state"
    port = free_port()
    ctl = Proc(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir", str(state),
         "--listen", f"127.0.0.1:{port}"],
        port, tmp_path / "controller.log",
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    follow: subprocess.Popen[str] | None = None
    try:
        wait_port(port)
        out = cli(api, "deploy", "fraud/rel/1", "--command", f"{sys.executable} serve.py",
                  "--wait", "60", cwd=app)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "fraud/rel/1: running" in out.stdout
        [v1] = json.loads(cli(api, "versions", "fraud/rel", "-o", "json").stdout)["versions"]
        assert v1["spec"]["workdir"] == str(app)

        out = cli(api, "logs", "fraud/rel/1", cwd=elsewhere)
        assert out.returncode == 0, out.stderr
        assert "greeting: hello from the app folder" in out.stdout
        assert f"--- starting {sys.executable} serve.py in {app} on port" in out.stdout

        # -f: the last lines, then what is written after (here: a restart's output).
        follow = subprocess.Popen(
            [sys.executable, "-m", "merlin_dp", "logs", "fraud/rel/1", "-f", "-n", "5",
             "--controller", api],
            cwd=elsewhere, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        lines = _lines(follow)
        seen = [lines.get(timeout=30)]
        assert seen[0].startswith("==> fraud_rel_1-"), seen
        while "greeting:" not in seen[-1]:
            seen.append(lines.get(timeout=30))
        [pid] = replica_pids(state)
        os.kill(pid, signal.SIGKILL)  # its restart writes to the same log
        restarted = len(seen)
        while "greeting:" not in seen[-1] or len(seen) == restarted:
            seen.append(lines.get(timeout=30))
            assert seen[-1], seen  # "": the stream ended early
        assert any(line.startswith("--- starting") for line in seen[restarted:])

        out = cli(api, "status", "fraud/nothing", cwd=elsewhere)
        assert one_line_error(out) == (
            "merlin-dp: no model endpoint or version endpoints for fraud/nothing"
        )
        out = cli(api, "logs", "fraud/nothing/1", cwd=elsewhere)
        assert "404 not_found" in one_line_error(out)
    finally:
        if follow is not None:
            follow.terminate()
            follow.wait(10)
        ctl.stop()


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """A process's output lines as they come ("" at its end), to wait on with a timeout."""
    out: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                out.put(line)
        out.put("")

    threading.Thread(target=read, daemon=True).start()
    return out


# --- model URLs --------------------------------------------------------------------------


def test_model_urls_carry_the_scheme_and_the_gateways_ports(tmp_path: Path) -> None:
    up = Up(tmp_path, tmp_path / "state")
    try:
        up.wait_up()
        out = cli(up.api, "deploy", "fraud/scorer/1", "--command", SERVE, "--wait", "60")
        assert out.returncode == 0, out.stderr
        assert f"fraud/scorer/1: running  http://scorer-1.fraud.localhost:{up.port}" in out.stdout
        out = cli(up.api, "deploy", "fraud/rows/1", "--type", "pyfunc", "--protocol", "UPI_V1",
                  "--model-dir", str(ROOT / "examples" / "upi"),
                  "--pyfunc-class", "row_scorer:RowScorer", "--wait", "60")  # fmt: skip
        assert out.returncode == 0, out.stderr
        # UPI_V1: a gRPC target, host:port, as grpc.insecure_channel takes it.
        assert f"fraud/rows/1: running  rows-1.fraud.localhost:{up.grpc_port}  (" in out.stdout
        assert cli(up.api, "route", "fraud/scorer", "--weights", "1=100").returncode == 0
        out = cli(up.api, "route", "fraud/rows", "--weights", "1=100", "--protocol", "UPI_V1")
        assert out.returncode == 0, out.stderr

        [v] = json.loads(cli(up.api, "versions", "fraud/scorer", "-o", "json").stdout)["versions"]
        assert v["url"] == f"http://scorer-1.fraud.localhost:{up.port}"
        status = json.loads(cli(up.api, "status", "fraud/scorer", "-o", "json").stdout)
        http_url = status["endpoint"]["url"]
        assert http_url == f"http://scorer.fraud.localhost:{up.port}"
        assert status["versions"][0]["url"] == v["url"]
        assert v["url"] in cli(up.api, "versions", "fraud/scorer").stdout
        status = json.loads(cli(up.api, "status", "fraud/rows", "-o", "json").stdout)
        grpc_target = status["endpoint"]["url"]
        assert grpc_target == f"rows.fraud.localhost:{up.grpc_port}"
        assert status["versions"][0]["url"] == f"rows-1.fraud.localhost:{up.grpc_port}"

        # Each URL as printed reaches its model through the gateway. *.localhost needs no
        # DNS for curl, but getaddrinfo (and so grpcio) may not resolve it: connect to
        # 127.0.0.1 and send the URL's host, as curl --resolve / default_authority do.
        parts = urlsplit(http_url)
        assert parts.port == up.port
        answer = _http_predict(parts.hostname or "", up.port)
        assert answer.get("model") == "scorer-1", answer
        host, _, grpc_port = grpc_target.rpartition(":")
        assert _grpc_predict(host, int(grpc_port)) == [("r1", 2.5)]
    finally:
        up.stop()


def _http_predict(host: str, port: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:  # until the gateway has the route table with the rule
        out = subprocess.run(
            ["curl", "-s", "--resolve", f"{host}:{port}:127.0.0.1",
             f"http://{host}:{port}/v1/predict", "-d", '{"instances": [[1, 1.5]]}'],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        try:
            body: dict[str, Any] = json.loads(out.stdout)
        except ValueError:
            body = {}
        if "predictions" in body or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def _grpc_predict(authority: str, port: int) -> list[tuple[str, float]]:
    options = [("grpc.default_authority", authority)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = upi_pb2_grpc.UniversalPredictionServiceStub(channel)  # type: ignore[no-untyped-call]
        table = make_table([("a", DOUBLE)], [("r1", [2.5])])
        deadline = time.monotonic() + 30
        while True:  # until the gateway has the route table with the rule
            try:
                return scores(stub.PredictValues(request(table), timeout=5))
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
