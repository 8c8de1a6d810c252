"""The pyfunc confinement and the replica records: regression tests from a review, each
a bug it caught, against a real controller process and real replicas."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_controller_auth import (
    ECHO_MODEL,
    HOST,
    TOKENS,
    WRITER,
    ControllerProcess,
    version_path,
)


def test_a_directory_in_the_model_dir_lets_the_class_come_from_the_stdlib(
    tmp_path: Path,
) -> None:
    """A subdirectory of the model dir with no ``__init__.py`` (MLflow's ``code/``, a
    ``data/`` or ``tests/`` folder) passes both confinement checks — auth._module_in
    counts any directory, pyfunc._confine's PathFinder.find_spec(top, [model_dir]) returns
    a namespace spec for it — but it is only a namespace *portion*: the import goes on
    down sys.path (the controller's working directory, the stdlib, site-packages) and a
    regular module of that name wins. So a writer without host gets
    ``code:InteractiveConsole`` from the standard library loaded and constructed in a
    replica, which docs/security.md says can't happen ("A class path can't reach the
    rest of the interpreter's modules")."""
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    model = tmp_path / "models" / "echo"
    (model / "code").mkdir(parents=True)  # MLflow's layout: the model's code/ folder
    (model / "echo_model.py").write_text(ECHO_MODEL)
    ctl = ControllerProcess(tmp_path, "--tokens", "tokens.yaml",
                            "--model-root", str(tmp_path / "models"))  # fmt: skip
    try:
        spec = {"type": "pyfunc", "model_dir": str(model),
                "pyfunc_class": "code:InteractiveConsole",
                "ready_deadline_seconds": 60}  # fmt: skip
        status, body = ctl.call("PUT", version_path("1"), WRITER, spec)
        if status == 403:
            return  # refused at the API: fixed
        assert status == 202, body
        failed = ctl.wait_status(version_path("1"), WRITER, "failed")
        # Fixed, the server refuses the name; today it imported the stdlib's code module
        # and built its InteractiveConsole, failing only for want of a load() method.
        assert "has no load() method" not in failed["message"], failed["message"]
        assert "the class must live there" in failed["message"], failed["message"]
    finally:
        ctl.stop()


# A custom replica that renames itself the way nginx, PostgreSQL and Python's
# setproctitle (gunicorn uses it when installed) do: the title is written over the
# argv+environ area and the rest padded with NULs, after which /proc/<pid>/environ and
# /proc/<pid>/cmdline read the title, not what the process was started with.
TITLED_REPLICA = r"""
import ctypes, http.server, os, sys

port = int(os.environ["CARAML_HTTP_PORT"])
stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
arg_start, env_end = int(stat[45]), int(stat[48])  # fields 48 and 51 of proc(5)
libc = ctypes.CDLL(None)
libc.clearenv()  # os.environ keeps its copy; C's getenv no longer reads the area
title = b"model-server: master"
ctypes.memset(arg_start, 0, env_end - arg_start)
ctypes.memmove(arg_start, title, len(title))


class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(240)
def test_an_orphan_that_retitles_itself_is_never_reaped(tmp_path: Path) -> None:
    """The local runtime finds an earlier run's replicas by the MERLIN_DP_REPLICA marker
    in /proc/<pid>/environ, or by pid plus command line (runtime/local.py _live_pids and
    _still_it). A replica that sets its process title over the argv+environ area (nginx,
    gunicorn with setproctitle, PostgreSQL) has neither any more: _still_it sees a
    readable environ without the marker and answers False, so after the controller is
    killed the next start deletes the replica's record at once (reap_orphans) although
    the process is alive and serving, and nothing ever stops it."""
    (tmp_path / "replica.py").write_text(TITLED_REPLICA)
    spec: dict[str, Any] = {
        "type": "custom",
        "command": [sys.executable, str(tmp_path / "replica.py")],
        "ready_deadline_seconds": 60,
    }
    ctl = ControllerProcess(tmp_path)
    orphan = 0
    try:
        status, body = ctl.call("PUT", version_path("1"), None, spec)
        assert status == 202, body
        ctl.wait_status(version_path("1"), HOST, "running")
        records = list((ctl.state / "runtime" / "replicas").glob("*.json"))
        assert len(records) == 1, records
        orphan = int(json.loads(records[0].read_text())["pid"])
        deadline = time.monotonic() + 30  # hang guard: the title is set at its start
        while b"MERLIN_DP_REPLICA" in Path(f"/proc/{orphan}/environ").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The controller crashes; its replica (a session of its own) keeps serving.
        ctl.proc.send_signal(signal.SIGKILL)
        ctl.proc.wait(30)
        ctl.stop()
        assert _alive(orphan)

        ctl = ControllerProcess(tmp_path)
        # "the record is deleted only once nothing it names is alive"
        assert records[0].exists() or not _alive(orphan), (
            f"the record of replica pid {orphan} was deleted while it runs"
        )
        # And the hand-over stops it once this run's own replica is ready (hang guard:
        # the hand-over's 60 s limit, the drain and the stop grace).
        deadline = time.monotonic() + 120
        while _alive(orphan):
            assert time.monotonic() < deadline, f"the earlier run's replica {orphan} lives on"
            time.sleep(0.2)
    finally:
        ctl.stop()
        if orphan and _alive(orphan):
            os.kill(orphan, signal.SIGKILL)
