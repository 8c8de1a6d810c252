"""The replica the soak deploys: a small model server under the replica contract, started
by the controller's local runtime as ``python -m loadtests.soak --serve-replica``; and
telling its processes apart (that flag on the command line, ``SOAK_DIR`` in the
environment), during a scenario and after the run."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from loadtests.harness.procfs import cmdline, environ, gone_or_zombie
from merlin_dp.common.net import LOOPBACK

REPLICA_FLAG = "--serve-replica"


def replica_command() -> list[str]:
    """How the controller's runtime starts a soak replica (this interpreter)."""
    return [sys.executable, "-m", "loadtests.soak", REPLICA_FLAG]


def serve_replica() -> None:
    """A model server under the replica contract, run by the controller's local runtime.

    ``POST /v1/models/<full name>:predict`` answers a small JSON after ``SOAK_DELAY_MS``
    (or never, with ``SOAK_HANG=1``); readiness and liveness as the contract says. Before
    anything else a predict appends its ``X-Request-Id`` to
    ``$SOAK_DIR/received-<pid>-<port>.log`` (unbuffered), so after a SIGKILL the harness
    knows which requests the replica had read."""
    from aiohttp import web

    port = int(os.environ["CARAML_HTTP_PORT"])
    full_name = os.environ["CARAML_MODEL_FULL_NAME"]
    version = os.environ.get("CARAML_MODEL_VERSION", "")
    delay = float(os.environ.get("SOAK_DELAY_MS", "0")) / 1000
    hang = os.environ.get("SOAK_HANG") == "1"
    log_dir = Path(os.environ.get("SOAK_DIR", "."))
    fd = os.open(
        log_dir / f"received-{os.getpid()}-{port}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND
    )
    answer = json.dumps({"predictions": [6.0], "model": full_name, "version": version}).encode()

    async def predict(request: web.Request) -> web.Response:
        os.write(fd, request.headers.get("X-Request-Id", "-").encode() + b"\n")
        await request.read()
        if hang:
            await asyncio.sleep(3600)
        elif delay:
            await asyncio.sleep(delay)
        return web.Response(body=answer, content_type="application/json")

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"name": full_name, "ready": True})

    async def alive(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application(client_max_size=128 * 1024 * 1024)
    app.router.add_post(f"/v1/models/{full_name}:predict", predict)
    app.router.add_get(f"/v1/models/{full_name}", ready)
    app.router.add_get("/", alive)
    web.run_app(app, host=LOOPBACK, port=port, print=None, access_log=None)


def replica_dir_of(pid: int) -> str | None:
    """The ``SOAK_DIR`` of process `pid` if it is a soak replica ("" if it has none);
    None if it is not one."""
    if REPLICA_FLAG not in cmdline(pid):
        return None
    return environ(pid).get("SOAK_DIR", "")


def orphans(workdir: Path) -> list[int]:
    """Replica processes of this run still alive (there should be none)."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        pid = int(pid_dir.name)
        soak_dir = replica_dir_of(pid)
        if soak_dir is not None and soak_dir.startswith(str(workdir)) and not gone_or_zombie(pid):
            found.append(pid)
    return found
