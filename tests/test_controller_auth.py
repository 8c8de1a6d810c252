"""Malformed credentials and requests aiohttp can't parse, sent to a real controller over
raw sockets: each gets the API's JSON error, never a 500, a trace or an echo."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from merlin_dp.common.net import free_port
from merlin_dp.controller.server import ControllerConfig, start_controller
from tests.conftest import ROOT
from tests.test_bad_inputs import raw_exchange

TOKEN = b"write-fraud-0001"


@pytest.fixture
async def port(tmp_path: Path) -> AsyncIterator[int]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n  - {name: ci, token: " + TOKEN.decode() + ", access: write, projects: ['*']}\n"
    )
    config = ControllerConfig(state_dir=tmp_path / "s", port=0, tokens_file=tokens, runtime="none")
    controller, runner, port = await start_controller(config)
    yield port
    await runner.cleanup()
    await controller.close()


def get(path: bytes, authorization: bytes | None = None) -> bytes:
    auth = b"Authorization: " + authorization + b"\r\n" if authorization is not None else b""
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: controller\r\n" + auth + b"Connection: close\r\n\r\n"
    )


MALFORMED = {
    "not UTF-8": b"Bearer \xff\xfe" + TOKEN,
    "Latin-1 letter": b"Bearer caf\xe9-0001",
    "the token with a byte more": b"Bearer " + TOKEN + b"\x80",
    "no token": b"Bearer ",
    "another scheme": b"Basic " + TOKEN,
    "no scheme": TOKEN,
}


@pytest.mark.parametrize("authorization", MALFORMED.values(), ids=list(MALFORMED))
async def test_a_malformed_credential_is_a_401(
    port: int, authorization: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A byte that isn't UTF-8 answered 500 and logged an ERROR with a trace."""
    caplog.set_level(logging.INFO)
    status, headers, body = await raw_exchange(port, get(b"/v1/routes", authorization))
    assert status == 401, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The right token still works.
    status, _, _ = await raw_exchange(port, get(b"/v1/routes", b"Bearer " + TOKEN))
    assert status == 200


async def test_an_oversized_token_gets_a_json_error_without_the_token(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp answered 400 in plain text, repeating the start of the token."""
    caplog.set_level(logging.INFO)
    token = b"S3CRET" * 4000  # 24 KB, over aiohttp's 8 KiB per header field
    status, headers, body = await raw_exchange(port, get(b"/v1/routes", b"Bearer " + token))
    assert status == 431
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == {
        "code": "headers_too_large",
        "message": "a request header is too large",
        "fields": [],
    }
    assert b"S3CRET" not in body
    status, headers, body = await raw_exchange(port, get(b"/v1/" + b"x" * 20_000))
    assert status == 414 and json.loads(body)["error"]["code"] == "uri_too_long"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- project scopes contain their writers: running code on the host is its own permission --


class ControllerProcess:
    """`merlin-dp controller` as a process, run in ``cwd`` (where a relative path in a
    replica's command points when it has no workdir)."""

    def __init__(self, cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.state = cwd / "state"
        self.log = cwd / "controller.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "merlin_dp", "controller", "--state-dir",
             str(self.state), "--listen", f"127.0.0.1:{self.port}", *args],
            cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "controller API on" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def call(
        self, method: str, path: str, token: str | None = None, body: Any = None
    ) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     data.encode() if isinstance(data, str) else data,
                                     headers=headers, method=method)  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_status(self, path: str, token: str, status: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while (body := self.call("GET", path, token)[1]).get("status") != status:
            assert time.monotonic() < deadline, (body, self.log.read_text())
            time.sleep(0.1)
        return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self._out.close()


WRITER, HOST = "project-a-writer-01", "project-a-host-0001"
TOKENS = f"""tokens:
  - {{name: a-writer, token: {WRITER}, access: write, projects: [a]}}
  - {{name: a-host, token: {HOST}, access: write, projects: [a], host: true}}
"""
PROBE: dict[str, Any] = {
    "type": "custom",
    "command": ["/bin/sh", "-c", "cat tokens.yaml > leak.txt"],
}
ECHO_MODEL = """
class Echo:
    def load(self):
        pass

    def predict(self, payload):
        return {"predictions": payload["instances"]}
"""


def version_path(version: str) -> str:
    return f"/v1/projects/a/models/m/versions/{version}/endpoint"


@pytest.fixture
def scoped(tmp_path: Path) -> Iterator[ControllerProcess]:
    """A controller with a project-scoped writer, a host token, and one model root."""
    (tmp_path / "tokens.yaml").write_text(TOKENS)
    model = tmp_path / "models" / "echo"
    model.mkdir(parents=True)
    (model / "echo_model.py").write_text(ECHO_MODEL)
    outside = tmp_path / "outside"  # a model, but not under the root
    outside.mkdir()
    (outside / "echo_model.py").write_text(ECHO_MODEL)
    (tmp_path / "models" / "escape").symlink_to(outside)
    ctl = ControllerProcess(tmp_path, "--tokens", "tokens.yaml",
                            "--model-root", str(tmp_path / "models"))  # fmt: skip
    yield ctl
    ctl.stop()


def test_a_project_writer_cannot_run_a_command_on_the_host(
    scoped: ControllerProcess, tmp_path: Path
) -> None:
    """A token limited to project a deployed `cat tokens.yaml > leak.txt` and had every
    token in leak.txt within 3 s."""
    status, body = scoped.call("PUT", version_path("1"), WRITER, PROBE)
    assert status == 403, body
    error = body["error"]
    assert error["code"] == "forbidden"
    assert error["message"].startswith("a-writer lacks the host permission (a token with host")
    assert {f["path"] for f in error["fields"]} == {"type", "command"}
    # Nothing changed: no version, no audit entry, no replica ever started.
    assert scoped.call("GET", version_path("1"), WRITER)[0] == 404
    assert not (tmp_path / "leak.txt").exists()
    assert not list((scoped.state / "runtime" / "logs").iterdir())
    assert not list((scoped.state / "runtime" / "replicas").iterdir())
    # The probe is real: a token with host may run it, and gets every token.
    status, body = scoped.call("PUT", version_path("1"), HOST, PROBE)
    assert status == 202, body
    deadline = time.monotonic() + 60
    while not (tmp_path / "leak.txt").exists() or not (tmp_path / "leak.txt").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert WRITER in (tmp_path / "leak.txt").read_text()
    assert scoped.call("GET", "/v1/audit?limit=5", HOST)[0] == 403  # host is not every project


def test_without_host_only_models_under_a_model_root(
    scoped: ControllerProcess, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    echo: dict[str, Any] = {
        "type": "pyfunc",
        "pyfunc_class": "echo_model:Echo",
        "ready_deadline_seconds": 60,
    }
    refused: dict[str, dict[str, Any]] = {
        "/": {"model_dir": "/"},
        "root/../..": {"model_dir": f"{root}/../.."},
        "a symlink out": {"model_dir": str(root / "escape")},
        "a relative path": {"model_dir": "models/echo"},
        "a module from elsewhere": {"model_dir": str(root / "echo"),
                                    "pyfunc_class": "json:JSONDecoder"},
        "a custom command beside the model": {"model_dir": str(root / "echo"), "type": "custom",
                                              "command": ["true"]},
    }  # fmt: skip
    expected = {"/": "model_dir", "root/../..": "model_dir", "a symlink out": "model_dir",
                "a relative path": "model_dir", "a module from elsewhere": "pyfunc_class",
                "a custom command beside the model": "command"}  # fmt: skip
    for case, over in refused.items():
        status, body = scoped.call("PUT", version_path("1"), WRITER, {**echo, **over})
        assert status == 403, (case, body)
        assert expected[case] in [f["path"] for f in body["error"]["fields"]], (case, body)
    status, body = scoped.call("PUT", version_path("1"), WRITER,
                               {**echo, "model_dir": f"{root}/../outside"})  # fmt: skip
    assert status == 403 and f"{tmp_path}/outside is outside the model roots" in str(body)
    assert scoped.call("GET", version_path("1"), WRITER)[0] == 404
    assert not list((scoped.state / "runtime" / "logs").iterdir())

    # Under the root it deploys and serves, with environment variables of its own...
    ok = {**echo, "model_dir": str(root / "echo"), "env_vars": {"MODEL_THRESHOLD": "0.5"}}
    status, body = scoped.call("PUT", version_path("1"), WRITER, ok)
    assert status == 202, body
    assert scoped.wait_status(version_path("1"), WRITER, "running")["replicas"]
    # ...but none that makes the loader, Python or a shell load other code.
    for name in ("LD_PRELOAD", "PYTHONPATH", "PYTHONSTARTUP", "PATH", "path", "BASH_ENV",
                 "OPENSSL_CONF", "HOME"):  # fmt: skip
        status, body = scoped.call("PUT", version_path("2"), WRITER,
                                   {**ok, "env_vars": {name: "/tmp/x"}})  # fmt: skip
        assert status == 403, (name, body)
        assert body["error"]["fields"] == [
            {"path": f"env_vars.{name}", "message": "can make the server load or run other code"}
        ]
    assert scoped.call("GET", version_path("2"), WRITER)[0] == 404
    # A token with host may name any directory and any variable.
    anywhere = {**echo, "model_dir": str(tmp_path / "outside"), "env_vars": {"PATH": "/usr/bin"}}
    status, body = scoped.call("PUT", version_path("2"), HOST, anywhere)
    assert status == 202, body
    scoped.wait_status(version_path("2"), HOST, "running")


def test_a_pyfunc_class_loads_from_its_model_dir_only(
    scoped: ControllerProcess, tmp_path: Path
) -> None:
    """Even with host: the pyfunc server imports the class from model_dir, not from
    whatever else the interpreter can import."""
    spec = {"type": "pyfunc", "model_dir": str(tmp_path / "models" / "echo"),
            "pyfunc_class": "json:JSONDecoder", "ready_deadline_seconds": 60}  # fmt: skip
    status, body = scoped.call("PUT", version_path("1"), HOST, spec)
    assert status == 202, body
    failed = scoped.wait_status(version_path("1"), HOST, "failed")
    assert "pyfunc: no module json in the model directory" in failed["message"]


def test_replicas_do_not_inherit_the_controllers_tokens(tmp_path: Path) -> None:
    """Tokens given in MERLIN_DP_TOKENS were in every replica's environment."""
    ctl = ControllerProcess(tmp_path, env={"MERLIN_DP_TOKENS": TOKENS})
    try:
        spec = {"type": "custom", "command": ["/bin/sh", "-c", "env > env.txt; sleep 60"]}
        assert ctl.call("PUT", version_path("1"), HOST, spec)[0] == 202
        deadline = time.monotonic() + 60
        while "MERLIN_DP_REPLICA=" not in (seen := _read(tmp_path / "env.txt")):
            assert time.monotonic() < deadline, ctl.log.read_text()
            time.sleep(0.05)
        assert "MERLIN_DP_TOKENS" not in seen and WRITER not in seen
    finally:
        ctl.stop()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_without_tokens_everything_stays_allowed(tmp_path: Path) -> None:
    """The local laptop case: no tokens, an open API on loopback, no roots needed."""
    ctl = ControllerProcess(tmp_path, "--runtime", "none")
    try:
        spec = {**PROBE, "env_vars": {"LD_PRELOAD": "x.so"}, "workdir": str(tmp_path)}
        status, body = ctl.call("PUT", version_path("1"), None, spec)
        assert status == 202, body
    finally:
        ctl.stop()
    out = subprocess.run(
        [sys.executable, "-m", "merlin_dp", "controller", "--state-dir",
         str(tmp_path / "s2"), "--listen", f"127.0.0.1:{free_port()}",
         "--model-root", str(tmp_path / "nowhere")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"merlin-dp controller: --model-root {tmp_path / 'nowhere'} is not a directory"
    )
