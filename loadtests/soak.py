"""Soak and fault injection: ``python -m loadtests.soak``.

Each scenario starts a real stack of its own on 127.0.0.1 — ``merlin-dp controller`` (file
store and local runtime; Redis store in scenario 6; the autoscaler in scenario 4), one
``merlin-dp gateway`` process following it, and replicas the controller's runtime starts
(this module's own small model server, see :func:`serve_replica`) — runs a steady load of
normal clients through the gateway's stable URL, does one thing to the stack, and reports
requests sent, failed and the failures' causes:

1. ``weights``: the rule's weights changed every second for a minute;
2. ``blue-green``: switch and rollback, ten times;
3. ``replica-kill``: a serving replica killed with SIGKILL every 10 s;
4. ``scale``: 1 → 4 → 1 replicas by the autoscaler's policy while the load ramps up and
   down;
5. ``controller-restart``: the controller killed (SIGKILL) and started again;
6. ``redis-restart``: with the Redis store and the gateway on the Redis feed, Redis killed
   (SIGKILL) and started again;
7. ``hanging-shadow``: a shadow version (100% mirror) whose replica never answers;
8. ``abusive-clients``: beside the normal clients, raw-socket abusers: slowloris heads,
   a 1 MB header, a 100 MB body (declared, and chunked), 5,000 idle connections and
   malformed requests — what each got is reported.

The goal: no failed request from the normal clients, except requests in flight on a
replica killed with SIGKILL, counted apart: every normal request carries its own
``X-Request-Id`` (the gateway passes it on) and the replica appends each id it reads to
a log before anything else, so a failed request whose id a killed replica had logged was
in flight on it. For the instant between the replica's read and its log line, a 502
saying the replica closed the connection before answering (a replica closes, rather
than resets, only a request it has read) for a request under way at a kill and ended
within 2 s of it counts too, and the report says how many were told that way. The
gateway's memory stays bounded: its RSS after warm-up and its peak (``VmHWM`` from
/proc) are reported.

Normal clients are an asyncio/aiohttp pool (closed loop, keep-alive; scenario 8 adds one
caller opening a new connection per request): a harness can start, ramp and stop it
exactly and see every request's id and outcome, which Locust can't give it. The Locust
suites (``loadtests/locust_*.py``, ``merlin-dp loadtest``) are for running against your
own deployment.

The run prints a Markdown table, then each scenario's details, and ends with
``RESULT soak failed=<n> sent=<n>`` (failed: normal clients' failures not allowed by the
goal). Exit code 0 when that is 0 and every scenario ran. ``--short`` runs the brief
versions ``tests/test_soak.py`` runs (scenarios 1, 2, 3 and 8). ``--only 3,5`` picks
scenarios; ``--workdir DIR`` keeps every log and state directory there (otherwise a
temporary directory, removed after a clean run and kept, and named, otherwise).
Everything is bounded in time, loopback only, and every process started is stopped
(replicas left by a controller are found by the log each writes, killed, and reported).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from merlin_dp.loadtest.locust_common import failure_reason

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
PROJECT, MODEL = "soak", "scorer"
HOST = f"{MODEL}.{PROJECT}.localhost"
MODEL_BASE = f"/v1/projects/{PROJECT}/models/{MODEL}"
PAYLOAD = b'{"instances": [[1.0, 2.0, 3.0]]}'
REPLICA_FLAG = "--serve-replica"
# Each replica takes this long per predict: requests are in flight on it when it is killed.
DELAY_MS = 10.0
CLIENTS = 8
CLIENT_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0
MIB = 1024 * 1024


# --- the replica the soak deploys --------------------------------------------------------


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

    app = web.Application(client_max_size=128 * MIB)
    app.router.add_post(f"/v1/models/{full_name}:predict", predict)
    app.router.add_get(f"/v1/models/{full_name}", ready)
    app.router.add_get("/", alive)
    web.run_app(app, host=LOOPBACK, port=port, print=None, access_log=None)


# --- processes --------------------------------------------------------------------------


class SoakError(RuntimeError):
    """The stack could not be brought up (or a step of a scenario could not run)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """A process of the stack, in its own session, output to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, SIGKILL after ``grace``; reaped either way."""
        if self.alive():
            self.kill(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check(self, doing: str) -> None:
        if not self.alive():
            raise SoakError(
                f"{self.name} exited ({self.popen.returncode}) while {doing}; "
                f"{self.log}:\n{self.tail()}"
            )


async def wait_port(port: int, child: Child, within: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + within
    while True:
        child.check(f"waiting for port {port}")
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SoakError(
                    f"{child.name}: nothing on port {port} after {within:g} s"
                ) from None
            await asyncio.sleep(0.05)


def proc_status(pid: int, field_name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, in bytes (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


# --- the stack ------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionPlan:
    """One version endpoint the stack deploys (our replica, under the contract)."""

    replicas: int = 1
    max_replicas: int | None = None
    delay_ms: float = DELAY_MS
    hang: bool = False


@dataclass(frozen=True)
class StackPlan:
    versions: Mapping[str, VersionPlan]
    rule: Mapping[str, Any]
    autoscale: bool = False  # controller --gateway-admin, with fast timings
    redis: bool = False  # controller --store redis://, gateway --redis
    serving: str = "1"  # the version the rule sends traffic to at first


def weights_rule(weights: Mapping[str, int], **extra: Any) -> dict[str, Any]:
    return {"destinations": [{"version": v, "weight": w} for v, w in weights.items()], **extra}


class Stack:
    """Controller, gateway, (Redis) and replicas on 127.0.0.1, for one scenario."""

    def __init__(self, workdir: Path, plan: StackPlan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.replica_dir = workdir / "replicas"
        self.replica_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "state"
        self.controller_port = free_port()
        self.port = free_port()
        self.admin_port = free_port()
        self.redis_port = free_port()
        self.controller: Child | None = None
        self.gateway: Child | None = None
        self.redis: Child | None = None
        self.session: aiohttp.ClientSession | None = None
        self.notes: list[str] = []
        self._controller_starts = 0
        self._redis_starts = 0

    # processes

    @property
    def api(self) -> str:
        return f"http://{LOOPBACK}:{self.controller_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    async def start(self) -> Stack:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        if self.plan.redis:
            await self.start_redis()
        await self.start_controller()
        for version, vplan in self.plan.versions.items():
            await self.deploy(version, vplan)
        for version in self.plan.versions:
            await self.wait_version(version)
        status, body = await self.call("PUT", "/endpoint", {"rule": self.plan.rule})
        if status not in (200, 201):
            raise SoakError(f"setting the rule: {status} {body}")
        feed = ["--redis", self.redis_url] if self.plan.redis else ["--controller", self.api]
        self.gateway = Child(
            "gateway",
            [sys.executable, "-m", "merlin_dp", "gateway", *feed,
             "--listen", f"{LOOPBACK}:{self.port}", "--admin", f"{LOOPBACK}:{self.admin_port}",
             "--shutdown-seconds", "2", "--log-level", "WARNING"],
            self.workdir / "gateway.log",
        )  # fmt: skip
        await wait_port(self.port, self.gateway)
        await self.wait_serving(self.plan.serving)
        return self

    async def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            from loadtests.bench import BenchError, ensure_tools

            try:
                binary = ensure_tools(["redis-server"])["redis-server"]
            except BenchError as exc:
                raise SoakError(f"redis-server is needed: {exc}") from None
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        self._redis_starts += 1
        self.redis = Child(
            "redis",
            [binary, "--port", str(self.redis_port), "--bind", LOOPBACK, "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)],
            self.workdir / f"redis-{self._redis_starts}.log",
        )  # fmt: skip
        await wait_port(self.redis_port, self.redis)

    async def start_controller(self) -> None:
        argv = [
            sys.executable, "-m", "merlin_dp", "controller",
            "--state-dir", str(self.state_dir), "--listen", f"{LOOPBACK}:{self.controller_port}",
            "--log-level", "WARNING",
        ]  # fmt: skip
        if self.plan.redis:
            argv += ["--store", self.redis_url]
        if self.plan.autoscale:
            argv += ["--gateway-admin", f"http://{LOOPBACK}:{self.admin_port}",
                     "--stable-window", "6", "--scale-down-delay", "3"]  # fmt: skip
        self._controller_starts += 1
        self.controller = Child(
            "controller", argv, self.workdir / f"controller-{self._controller_starts}.log"
        )
        await wait_port(self.controller_port, self.controller)

    async def stop(self) -> None:
        """Stop everything, newest first; then kill any replica still running, and say so."""
        for child in (self.gateway, self.controller, self.redis):
            if child is not None:
                await child.stop()
        if self.session is not None:
            await self.session.close()
        left = self.leftover_replicas()
        if left:
            self.notes.append(
                f"{len(left)} replica process(es) still ran after the controller stopped: killed"
            )
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def leftover_replicas(self) -> list[int]:
        return [pid for pid, _ in self.replica_processes() if not _zombie(pid)]

    def replica_processes(self) -> list[tuple[int, int]]:
        """(pid, port) of every replica of this stack still running."""
        found = []
        for log in self.replica_dir.glob("received-*-*.log"):
            _, pid_text, port_text = log.stem.split("-")
            pid, port = int(pid_text), int(port_text)
            if REPLICA_FLAG in _cmdline(pid) and (
                _environ(pid).get("SOAK_DIR") == str(self.replica_dir)
            ):
                found.append((pid, port))
        return found

    # the controller's API

    async def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, Any]:
        """A call to the model's API (``path`` relative to it); (status, JSON or text)."""
        assert self.session is not None
        async with self.session.request(method, self.api + MODEL_BASE + path, json=body) as resp:
            text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    async def deploy(self, version: str, vplan: VersionPlan) -> None:
        spec = {
            "type": "custom",
            "command": [sys.executable, "-m", "loadtests.soak", REPLICA_FLAG],
            "resource_request": {
                "min_replica": vplan.replicas,
                "max_replica": vplan.max_replicas or vplan.replicas,
            },
            "autoscaling_policy": {"metrics_type": "concurrency", "target_value": 1},
            "env_vars": {
                "SOAK_DIR": str(self.replica_dir),
                "SOAK_DELAY_MS": str(vplan.delay_ms),
                "SOAK_HANG": "1" if vplan.hang else "0",
            },
            "ready_deadline_seconds": STARTUP_TIMEOUT_S,
        }
        status, body = await self.call("PUT", f"/versions/{version}/endpoint", spec)
        if status not in (200, 201, 202):
            raise SoakError(f"deploying version {version}: {status} {body}")

    async def wait_version(self, version: str, within: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + within
        while True:
            assert self.controller is not None
            self.controller.check(f"deploying version {version}")
            status, body = await self.call("GET", f"/versions/{version}/endpoint")
            if status == 200 and body["status"] in ("running", "serving") and body["replicas"]:
                return
            if status == 200 and body["status"] == "failed":
                raise SoakError(f"version {version} failed: {body['message']}")
            if time.monotonic() > deadline:
                raise SoakError(f"version {version} not running after {within:g} s: {body}")
            await asyncio.sleep(0.1)

    async def ready_replicas(self, version: str) -> list[str]:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError, TypeError):
            status, body = await self.call("GET", f"/versions/{version}/endpoint")
            if status == 200:
                return list(body["replicas"])
        return []

    # the gateway

    async def predict(self, host: str = HOST) -> tuple[int, str]:
        assert self.session is not None
        async with self.session.post(
            f"http://{LOOPBACK}:{self.port}/v1/predict", data=PAYLOAD, headers={"Host": host}
        ) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Model-Version", "")

    async def wait_serving(self, version: str, within: float = STARTUP_TIMEOUT_S) -> float:
        """Wait until the stable URL answers 200 from ``version``; seconds it took."""
        started = time.monotonic()
        last: Any = None
        while time.monotonic() - started < within:
            assert self.gateway is not None
            self.gateway.check(f"waiting for version {version} to serve")
            try:
                last = await self.predict()
                if last == (200, version):
                    return time.monotonic() - started
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
        raise SoakError(f"gateway not serving version {version} after {within:g} s: {last}")

    def gateway_rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the gateway process, bytes."""
        assert self.gateway is not None
        return proc_status(self.gateway.pid, "VmRSS"), proc_status(self.gateway.pid, "VmHWM")

    async def controller_metrics(self) -> str:
        assert self.session is not None
        try:
            async with self.session.get(f"{self.api}/metrics") as r:
                return await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return ""

    async def gateway_metrics(self) -> str:
        assert self.session is not None
        try:
            async with self.session.get(f"http://{LOOPBACK}:{self.admin_port}/metrics") as r:
                return await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return ""

    def received_by(self, pids: Iterable[int]) -> set[str]:
        """Request ids the replicas with these pids had read."""
        wanted = {str(p) for p in pids}
        ids: set[str] = set()
        for log in self.replica_dir.glob("received-*-*.log"):
            if log.stem.split("-")[1] in wanted:
                ids.update(log.read_text(errors="replace").split())
        return ids


def metric_values(text: str, name: str) -> dict[str, float]:
    """``{label text: value}`` of one metric in Prometheus text (label text "" if none)."""
    out: dict[str, float] = {}
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


# --- normal clients ------------------------------------------------------------------------


def exception_kind(exc: BaseException) -> str:
    """A failed exchange's cause, short: ``connection ServerDisconnectedError``,
    ``connection ClientConnectorError ECONNREFUSED``, ``client timeout``."""
    if isinstance(exc, TimeoutError):
        return "client timeout"
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    return f"connection {type(exc).__name__} {name}".rstrip()


@dataclass(frozen=True)
class Failure:
    """One normal request that failed."""

    cause: str  # "HTTP 502 bad_gateway", "connection ServerDisconnectedError", …
    detail: str  # the start of the answer's body, if any
    began: float  # monotonic
    ended: float


def with_message(cause: str, body: bytes) -> str:
    """The cause with the gateway's error message, when the answer has one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return cause
    return f"{cause}: {message}" if isinstance(message, str) else cause


class Load:
    """Closed-loop normal clients posting to the stable URL; every outcome kept by id.

    ``active`` clients send (the rest wait), so a scenario can ramp the load; ``think``
    pauses each client between requests; ``fresh`` opens a new connection per request."""

    def __init__(
        self,
        port: int,
        name: str,
        clients: int = CLIENTS,
        *,
        fresh: bool = False,
        host: str = HOST,
        active: int | None = None,
    ) -> None:
        self.url = f"http://{LOOPBACK}:{port}/v1/predict"
        self.name = name
        self.clients = clients
        self.active = clients if active is None else active
        self.think = 0.0
        self.fresh = fresh
        self.host = host
        self.sent = 0
        self.ok = 0
        self.failures: dict[str, Failure] = {}  # by request id
        self.versions: Counter[str] = Counter()
        self.latencies: list[float] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=self.fresh),
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
            auto_decompress=False,
        )
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def stop(self) -> None:
        """Let every client finish the request it has in flight, then close."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLIENT_TIMEOUT_S + 5)
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _client(self, index: int) -> None:
        assert self._session is not None
        session = self._session
        n = 0
        while not self._stop.is_set():
            if index >= self.active:
                await asyncio.sleep(0.05)
                continue
            n += 1
            rid = f"{self.name}-{index}-{n}"
            headers = {"Host": self.host, "X-Request-Id": rid, "Content-Type": "application/json"}
            self.sent += 1
            began = time.monotonic()
            started = time.perf_counter()
            cause = detail = ""
            try:
                async with session.post(self.url, data=PAYLOAD, headers=headers) as resp:
                    body = await resp.read()
                    cause = failure_reason(resp.status, body)
                    detail = body[:300].decode(errors="replace")
                    if cause:
                        cause = with_message(cause, body)
                    if not cause:
                        self.ok += 1
                        self.versions[resp.headers.get("X-Model-Version", "-")] += 1
                        self.latencies.append(time.perf_counter() - started)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                cause = exception_kind(exc)
            if cause:
                self.failures[rid] = Failure(cause, detail, began, time.monotonic())
                await asyncio.sleep(0.01)  # no busy loop against a refusing gateway
            elif self.think:
                await asyncio.sleep(self.think)


# --- results ------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    number: int
    name: str
    action: str
    seconds: float = 0.0
    sent: int = 0
    ok: int = 0
    failed: int = 0  # normal clients' failures the goal does not allow
    killed_in_flight: int = 0  # in flight on a replica killed with SIGKILL (allowed)
    causes: Counter[str] = field(default_factory=Counter)
    failed_at: list[float] = field(default_factory=list)
    killed_causes: Counter[str] = field(default_factory=Counter)
    killed_by_timing: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def add_load(
        self, load: Load, killed_ids: set[str], kill_times: Sequence[float], t0: float
    ) -> None:
        """Count a load's outcomes. A failure is one in flight on a killed replica when
        that replica had logged reading it, or — for the moment between the replica's read
        and its log line — when it is a 502 saying the replica closed the connection
        before answering (a replica closes, rather than resets, only a request it had
        read) for a request that was under way at a kill and ended within 2 s of it."""
        self.sent += load.sent
        self.ok += load.ok
        self.versions.update(load.versions)
        self.latencies.extend(load.latencies)
        for rid, f in load.failures.items():
            by_log = rid in killed_ids
            by_time = not by_log and f.cause.startswith("HTTP 502 bad_gateway") and (
                "closed the connection before answering" in f.detail
            ) and any(f.began <= k <= f.ended <= k + 2 for k in kill_times)  # fmt: skip
            if by_log or by_time:
                self.killed_in_flight += 1
                self.killed_causes[f.cause] += 1
                self.killed_by_timing += by_time
            else:
                self.failed += 1
                self.causes[f.cause] += 1
                self.failed_at.append(f.ended - t0)

    def failure_span(self) -> str:
        """When the goal-breaking failures happened, seconds from the action's start."""
        if not self.failed_at:
            return ""
        return f"t={min(self.failed_at):.1f} s to t={max(self.failed_at):.1f} s"

    def percentile_ms(self, pct: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_start

    def row(self) -> list[str]:
        causes = ", ".join(f"{n}x {c}" for c, n in self.causes.most_common()) or "—"
        total = sum(self.versions.values())
        split = " ".join(f"v{v} {n / total:.0%}" for v, n in sorted(self.versions.items()))
        if self.error:
            causes = f"ERROR: {self.error.splitlines()[0][:120]}"
        killed = str(self.killed_in_flight)
        return [
            str(self.number), self.name, self.action, f"{self.seconds:.0f}", str(self.sent),
            str(self.failed), killed, causes, split or "—", f"{self.percentile_ms(50):.1f}",
            f"{self.percentile_ms(99):.1f}",
            f"{self.rss_start / MIB:.0f} → {self.rss_peak / MIB:.0f}",
        ]  # fmt: skip


HEADER = [
    "#", "scenario", "what was done", "s", "sent", "failed", "killed in flight",
    "failure causes", "answered by", "p50 ms", "p99 ms", "gateway RSS MB (start → peak)",
]  # fmt: skip


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(results: Sequence[ScenarioResult]) -> str:
    out = [markdown_table([r.row() for r in results]), ""]
    for r in results:
        out.append(f"{r.number}. {r.name}: {r.action}")
        out.append(
            f"   sent {r.sent}, answered 200 {r.ok}, failed {r.failed}, in flight on killed "
            f"replicas {r.killed_in_flight}; gateway RSS {r.rss_start / MIB:.1f} MB at start, "
            f"peak {r.rss_peak / MIB:.1f} MB, {r.rss_end / MIB:.1f} MB at the end"
        )
        for cause, n in r.causes.most_common():
            out.append(f"   failed: {n}x {cause}")
        if r.failed_at:
            out.append(f"   failures from {r.failure_span()} (t=0: the action's start)")
        for cause, n in r.killed_causes.most_common():
            out.append(f"   in flight on a killed replica: {n}x {cause}")
        if r.killed_by_timing:
            out.append(
                f"   ({r.killed_by_timing} of those told by timing: a 502 'closed before "
                "answering' around a kill, not yet in the replica's log)"
            )
        for note in r.notes:
            out.append(f"   - {note}")
        if r.error:
            out.append(f"   ERROR: {r.error}")
    failed = sum(r.failed for r in results)
    sent = sum(r.sent for r in results)
    out += ["", f"RESULT soak failed={failed} sent={sent}"]
    return "\n".join(out)


# --- running a scenario ---------------------------------------------------------------------


Action = Callable[[Stack, "Run"], Awaitable[None]]


@dataclass
class Run:
    """What an action sees and adds to while the load runs."""

    result: ScenarioResult
    loads: list[Load] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)
    kill_times: list[float] = field(default_factory=list)  # monotonic
    t0: float = 0.0  # when the action started (monotonic)

    def load(self) -> Load:
        return self.loads[0]

    def note(self, text: str) -> None:
        """A note stamped with the time since the action's start."""
        self.result.notes.append(f"t={time.monotonic() - self.t0:.1f} s: {text}")


async def run_scenario(
    workdir: Path,
    number: int,
    name: str,
    action_text: str,
    plan: StackPlan,
    action: Action,
    *,
    clients: int = CLIENTS,
    fresh_clients: int = 0,
    active: int | None = None,
    think: float = 0.0,
    warmup: float = 1.0,
    limit: float = 300.0,
) -> ScenarioResult:
    """Bring a stack up, start the normal clients, run ``action``, stop, account."""
    result = ScenarioResult(number, name, action_text)
    stack = Stack(workdir / f"{number}-{name}", plan)
    run = Run(result)
    started = 0.0
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            await stack.start()
            load = Load(stack.port, f"s{number}", clients, active=active)
            load.think = think
            run.loads.append(await load.start())
            if fresh_clients:
                run.loads.append(
                    await Load(stack.port, f"f{number}", fresh_clients, fresh=True).start()
                )
            await asyncio.sleep(warmup)
            result.rss_start = stack.gateway_rss()[0]
            started = run.t0 = time.monotonic()
            await action(stack, run)
    except TimeoutError as exc:
        result.error = f"did not finish within {limit:g} s" if deadline.expired() else repr(exc)
    except SoakError as exc:
        result.error = str(exc)
    except (aiohttp.ClientError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.seconds = time.monotonic() - started if started else 0.0
        for load in run.loads:
            await load.stop()
        if stack.gateway is not None and stack.gateway.alive():
            result.rss_end, result.rss_peak = stack.gateway_rss()
        elif stack.gateway is not None:
            result.notes.append(f"the gateway exited ({stack.gateway.popen.returncode})")
        killed = stack.received_by(run.killed_pids) if run.killed_pids else set()
        for load in run.loads:
            result.add_load(load, killed, run.kill_times, started or time.monotonic())
        await stack.stop()
        result.notes += stack.notes
    return result


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


def two_versions(weights: Mapping[str, int], **rule: Any) -> StackPlan:
    return StackPlan(
        versions={"1": VersionPlan(), "2": VersionPlan()},
        rule=weights_rule(weights, **rule),
        serving=max(weights, key=lambda v: weights[v]),
    )


# --- 1. weights changed every second ----------------------------------------------------------


async def scenario_weights(
    workdir: Path, duration: float = 60.0, interval: float = 1.0
) -> ScenarioResult:
    changes: Counter[int] = Counter()

    async def action(stack: Stack, run: Run) -> None:
        rng = random.Random(1)
        end = time.monotonic() + duration
        while time.monotonic() < end:
            tick = time.monotonic() + interval
            w1 = rng.randint(0, 100)
            status, body = await stack.call(
                "PUT", "/endpoint", {"rule": weights_rule({"1": w1, "2": 100 - w1})}
            )
            changes[status] += 1
            if status not in (200, 201):
                run.result.notes.append(f"weight change refused: {status} {body}")
            await sleep_until(tick)
        run.result.notes.append(
            "weight changes answered: " + ", ".join(f"{n}x {s}" for s, n in sorted(changes.items()))
        )

    n = round(duration / interval)
    return await run_scenario(
        workdir, 1, "weights", f"weights of v1/v2 set at random every {interval:g} s, {n} times",
        two_versions({"1": 50, "2": 50}), action, limit=duration + 120,
    )  # fmt: skip


# --- 2. blue-green switch and rollback ------------------------------------------------------


async def scenario_blue_green(
    workdir: Path, cycles: int = 10, pause: float = 1.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        answers: Counter[str] = Counter()
        for _ in range(cycles):
            for verb in ("switch", "rollback"):
                status, body = await stack.call("POST", f"/endpoint:{verb}", {})
                answers[f"{verb} {status}"] += 1
                if status != 200:
                    run.result.notes.append(f"{verb} refused: {status} {body}")
                await asyncio.sleep(pause)
        run.result.notes.append(
            "API answers: " + ", ".join(f"{n}x {a}" for a, n in sorted(answers.items()))
        )

    return await run_scenario(
        workdir, 2, "blue-green",
        f"switch v1→v2 and rollback, {cycles} times, {pause:g} s apart",
        two_versions({"1": 100, "2": 0}), action, limit=cycles * pause * 2 + 120,
    )  # fmt: skip


# --- 3. a replica killed every 10 s -------------------------------------------------------


async def kill_serving_replica(stack: Stack, run: Run, version: str, rng: random.Random) -> str:
    """SIGKILL one replica that the controller lists as ready; what was killed."""
    ready = {int(a.rpartition(":")[2]) for a in await stack.ready_replicas(version)}
    candidates = [(pid, port) for pid, port in stack.replica_processes() if port in ready]
    if not candidates:
        return "no ready replica to kill"
    pid, port = rng.choice(sorted(candidates))
    run.killed_pids.add(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    run.kill_times.append(time.monotonic())
    return f"pid {pid} (port {port})"


async def scenario_replica_kill(
    workdir: Path, duration: float = 60.0, every: float = 10.0, replicas: int = 3
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        rng = random.Random(3)
        start = time.monotonic()
        kills = 0
        lowest = replicas
        while True:
            at = start + every / 2 + kills * every
            if at > start + duration:
                break
            while time.monotonic() < at:
                lowest = min(lowest, len(await stack.ready_replicas("1")))
                await asyncio.sleep(min(0.2, max(0.0, at - time.monotonic())))
            what = await kill_serving_replica(stack, run, "1", rng)
            kills += 1
            run.note(f"SIGKILL {what}")
        await sleep_until(start + duration)
        back = await wait_replicas(stack, "1", replicas, 30.0)
        run.result.notes.append(
            f"{kills} kills; fewest ready replicas seen {lowest} of {replicas}; "
            + (f"all {replicas} ready again" if back else "NOT all ready again within 30 s")
        )

    n = int((duration - every / 2) // every) + 1
    return await run_scenario(
        workdir, 3, "replica-kill",
        f"SIGKILL a ready replica of {replicas} every {every:g} s ({n} kills)",
        StackPlan({"1": VersionPlan(replicas=replicas)}, weights_rule({"1": 100})),
        action, limit=duration + 150,
    )  # fmt: skip


async def wait_replicas(stack: Stack, version: str, count: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len(await stack.ready_replicas(version)) == count:
            return True
        await asyncio.sleep(0.2)
    return False


# --- 4. scale 1 → 4 → 1 by policy while the load ramps -----------------------------------------


async def scenario_scale(
    workdir: Path, peak_clients: int = 8, delay_ms: float = 50.0, hold: float = 6.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        load = run.load()
        seen: list[int] = []

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                n = len(await stack.ready_replicas("1"))
                if not seen or seen[-1] != n:
                    seen.append(n)
                    run.note(f"{n} ready")
                await asyncio.sleep(0.25)

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        try:
            # One client pausing 0.2 s between 50 ms requests (~0.2 busy): one replica.
            await wait_replicas(stack, "1", 1, 30.0)
            await asyncio.sleep(2)
            run.note(f"ramp up: one more client a second, to {peak_clients}, no pauses")
            load.think = 0.0
            for n in range(2, peak_clients + 1):
                load.active = n
                await asyncio.sleep(1)
            up = await wait_replicas(stack, "1", 4, 45.0)
            run.note("4 ready after the ramp" if up else "did NOT reach 4 replicas in 45 s")
            await asyncio.sleep(3)
            run.note("ramp down: one client fewer each 0.5 s, to one pausing 0.2 s again")
            for n in range(peak_clients - 1, 0, -1):
                load.active = n
                await asyncio.sleep(0.5)
            load.think = 0.2
            down = await wait_replicas(stack, "1", 1, 60.0)
            run.note("back to 1 replica" if down else "did NOT get back to 1 replica in 60 s")
            await asyncio.sleep(hold)  # the same light load: does it stay at one?
        finally:
            stop.set()
            await watcher
        run.result.notes.append("ready replicas over time: " + " → ".join(map(str, seen)))
        metrics = await stack.controller_metrics()
        decisions = metric_values(metrics, "merlin_autoscaler_decisions_total")
        if decisions:
            run.result.notes.append(
                "autoscaler decisions: "
                + ", ".join(f"{int(v)}x {_labels(k).get('reason', k)}"
                            for k, v in sorted(decisions.items(), key=lambda kv: -kv[1]))
            )  # fmt: skip
        peak = seen.index(max(seen)) if seen else 0
        if not seen or max(seen) < 4 or 1 not in seen[peak:]:
            raise SoakError("the autoscaler did not scale 1 → 4 → 1: " + " → ".join(map(str, seen)))
        if seen[-1] != 1:
            run.result.notes.append(
                f"after getting back to 1 it went up again to {seen[-1]} under the same light "
                "load (one client, ~0.2 busy)"
            )

    plan = StackPlan(
        {"1": VersionPlan(replicas=1, max_replicas=4, delay_ms=delay_ms)},
        weights_rule({"1": 100}), autoscale=True,
    )  # fmt: skip
    return await run_scenario(
        workdir, 4, "scale",
        f"load ramps 1 → {peak_clients} clients → 1 (concurrency policy, target 1, "
        "stable window 6 s, scale-down delay 3 s)",
        plan, action, clients=peak_clients, active=1, think=0.2, limit=240,
    )  # fmt: skip


# --- 5. the controller killed and restarted ------------------------------------------------


async def scenario_controller_restart(
    workdir: Path, down: float = 3.0, after: float = 8.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        await asyncio.sleep(1)
        before = dict(stack.replica_processes())
        assert stack.controller is not None
        stack.controller.kill(signal.SIGKILL)
        stack.controller.popen.wait(5)
        run.note(f"controller SIGKILLed; its {len(before)} replicas keep running")
        await asyncio.sleep(down)
        failed = sum(len(x.failures) for x in run.loads)
        await stack.start_controller()
        run.kill_times.append(time.monotonic())  # it SIGKILLs recorded replicas as it starts
        run.note(f"controller restarted (failures while it was down: {failed})")
        old_ports = set(before.values())
        reaped = fresh = False
        deadline = time.monotonic() + 30
        while not (reaped and fresh) and time.monotonic() < deadline:
            alive = dict(stack.replica_processes())
            if not reaped and not set(before) & set(alive):
                reaped = True
                run.note(f"all {len(before)} old replicas are gone (killed by the new controller)")
            ports = {int(a.rpartition(":")[2]) for v in ("1", "2")
                     for a in await stack.ready_replicas(v)}  # fmt: skip
            if not fresh and ports and not ports & old_ports:
                fresh = True
                run.note("the controller lists only new replicas as ready")
            await asyncio.sleep(0.05)
        gone = set(before) - {pid for pid, _ in stack.replica_processes()}
        run.killed_pids |= gone  # SIGKILLed by the new controller's orphan reaping
        await check_switch(stack, run, "after the restart")
        await asyncio.sleep(after)

    return await run_scenario(
        workdir, 5, "controller-restart",
        f"controller SIGKILLed, restarted {down:g} s later (same state dir), then a switch",
        two_versions({"1": 100, "2": 0}), action, limit=180,
    )  # fmt: skip


async def check_switch(stack: Stack, run: Run, when: str, within: float = 15.0) -> None:
    """Switch to version 2 and see the gateway follow (the route feed works again)."""
    status, body = await stack.call("POST", "/endpoint:switch", {"to_version": "2"})
    if status != 200:
        run.result.notes.append(f"switch {when} refused: {status} {body}")
        return
    try:
        took = await stack.wait_serving("2", within)
        run.result.notes.append(f"switch to v2 {when}: the gateway followed in {took:.2f} s")
    except SoakError as exc:
        run.result.notes.append(f"switch to v2 {when}: the gateway did NOT follow: {exc}")


# --- 6. Redis killed and restarted ---------------------------------------------------------------


async def scenario_redis_restart(
    workdir: Path, down: float = 3.0, after: float = 8.0
) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        await asyncio.sleep(1)
        assert stack.redis is not None
        stack.redis.kill(signal.SIGKILL)
        stack.redis.popen.wait(5)
        await asyncio.sleep(down)
        failed_while_down = sum(len(x.failures) for x in run.loads)
        await stack.start_redis()
        run.result.notes.append(
            f"Redis SIGKILLed, restarted after {down:g} s (append-only file kept); "
            f"failures while it was down: {failed_while_down}"
        )
        await asyncio.sleep(2)
        await check_switch(stack, run, "after Redis came back")
        await asyncio.sleep(after)

    plan = StackPlan(
        {"1": VersionPlan(), "2": VersionPlan()}, weights_rule({"1": 100, "2": 0}), redis=True
    )
    return await run_scenario(
        workdir, 6, "redis-restart",
        f"controller --store redis, gateway --redis; Redis SIGKILLed, restarted {down:g} s "
        "later, then a switch",
        plan, action, limit=180,
    )  # fmt: skip


# --- 7. a shadow version that hangs ----------------------------------------------------------


async def scenario_hanging_shadow(workdir: Path, duration: float = 40.0) -> ScenarioResult:
    async def action(stack: Stack, run: Run) -> None:
        await asyncio.sleep(duration)
        text = await stack.gateway_metrics()
        results = metric_values(text, "gateway_shadow_requests_total")
        summary = ", ".join(
            f"{int(v)}x {_labels(k).get('result', '')}"
            + (f" ({_labels(k)['reason']})" if _labels(k).get("reason") else "")
            for k, v in sorted(results.items())
        )
        run.result.notes.append(f"mirrored copies: {summary or 'no shadow metrics found'}")

    plan = StackPlan(
        {"1": VersionPlan(), "2": VersionPlan(hang=True)},
        weights_rule({"1": 100, "2": 0}, mirror={"version": "2", "percent": 100}),
    )
    return await run_scenario(
        workdir, 7, "hanging-shadow",
        f"100% mirrored to v2, whose replica never answers, for {duration:g} s "
        "(rule timeout 30 s)",
        plan, action, limit=duration + 120,
    )  # fmt: skip


def _labels(text: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', text))


# --- 8. abusive clients -----------------------------------------------------------------------


def _status(data: bytes) -> str:
    """``HTTP 408`` from the start of an answer, or ``closed`` for none."""
    if not data:
        return "closed without an answer"
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return f"HTTP {m.group(1).decode()}" if m else f"garbage {data[:20]!r}"


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 10)


async def _read_answer(read: asyncio.Future[bytes]) -> str:
    try:
        return _status(read.result())
    except (ConnectionError, OSError) as exc:  # e.g. reset while we were still sending
        return "no answer read: " + exception_kind(exc).replace("connection ", "")


async def slowloris(port: int, limit: float) -> str:
    """A request head sent a byte a second; what the gateway did and when."""
    started = time.monotonic()
    try:
        reader, writer = await _connect(port)
    except (OSError, TimeoutError) as exc:
        return f"connect failed: {exception_kind(exc)}"
    head = f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode()
    read = asyncio.ensure_future(reader.read(65536))
    outcome = ""
    try:
        i = 0
        while time.monotonic() - started < limit and not read.done():
            byte = head[i : i + 1] or b"a"
            i += 1
            try:
                writer.write(byte)
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                outcome = f"write failed ({exception_kind(exc)})"
                break
            await asyncio.wait([read], timeout=1.0)
        took = time.monotonic() - started
        if read.done():
            outcome = f"{await _read_answer(read)} after {took:.0f} s"
        elif not outcome:
            outcome = f"still open after {limit:.0f} s ({i} bytes sent)"
        else:
            outcome += f" after {took:.0f} s"
    finally:
        read.cancel()
        writer.close()
    return outcome


async def big_header(port: int, size: int = MIB) -> str:
    """A request with one header of ``size`` bytes."""
    started = time.monotonic()
    reader, writer = await _connect(port)
    read = asyncio.ensure_future(reader.read(65536))
    sent = 0
    try:
        writer.write(f"GET /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nX-Big: ".encode())
        block = b"a" * 65536
        with contextlib.suppress(ConnectionError, OSError):
            while sent < size and not read.done():
                writer.write(block)
                await writer.drain()
                sent += len(block)
            if not read.done():
                writer.write(b"\r\n\r\n")
                await writer.drain()
        await asyncio.wait([read], timeout=10)
        took = time.monotonic() - started
        if not read.done():
            return f"no answer in {took:.0f} s ({sent // 1024} KiB sent)"
        return f"{await _read_answer(read)} in {took:.2f} s after {sent // 1024} KiB of the header"
    finally:
        read.cancel()
        writer.close()


async def big_body(port: int, size: int = 100 * MIB, chunked: bool = False) -> str:
    """A POST with a ``size``-byte body, declared (Content-Length) or chunked; sent until
    the gateway answers, or all of it."""
    started = time.monotonic()
    reader, writer = await _connect(port)
    read = asyncio.ensure_future(reader.read(65536))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    sent = 0
    try:
        writer.write(
            f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n\r\n".encode()
        )
        block = b"7" * (256 * 1024)
        frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
            await asyncio.wait([read], timeout=0.2)  # a fast refusal comes before any body
            while sent < size and not read.done() and time.monotonic() - started < 60:
                writer.write(frame)
                await writer.drain()
                sent += len(block)
            if chunked and not read.done():
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        await asyncio.wait([read], timeout=30)
        took = time.monotonic() - started
        if not read.done():
            return f"no answer in {took:.0f} s ({sent / MIB:.1f} MB sent)"
        return f"{await _read_answer(read)} in {took:.2f} s after {sent / MIB:.1f} MB of the body"
    finally:
        read.cancel()
        writer.close()


def _request(head: str, *headers: str, body: bytes = b"", eol: str = "\r\n") -> bytes:
    lines = [head, f"Host: {HOST}", *headers, "", ""]
    return eol.join(lines).encode("latin-1") + body


MALFORMED: dict[str, bytes] = {
    "garbage request line": b"HELLO THERE\r\n\r\n",
    "binary junk": bytes(range(256)) * 4 + b"\r\n\r\n",
    "HTTP/9.9": _request("GET /v1/predict HTTP/9.9"),
    "space in a header name": _request("GET /v1/predict HTTP/1.1", "Bad Name: x"),
    "NUL in a header value": _request("GET /v1/predict HTTP/1.1", "X-A: a\0b"),
    "negative Content-Length": _request("POST /v1/predict HTTP/1.1", "Content-Length: -5"),
    "two Content-Lengths": _request(
        "POST /v1/predict HTTP/1.1", "Content-Length: 1", "Content-Length: 2", body=b"xx"
    ),
    "Content-Length and chunked": _request(
        "POST /v1/predict HTTP/1.1",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        body=b"0\r\n\r\n",
    ),
    "bad chunk size": _request(
        "POST /v1/predict HTTP/1.1", "Transfer-Encoding: chunked", body=b"zz\r\nxx\r\n0\r\n\r\n"
    ),
    "100 KB request line": _request("GET /" + "a" * 100_000 + " HTTP/1.1"),
    "bare LF line ends": _request("GET /v1/predict HTTP/1.1", eol="\n"),
}


async def malformed(port: int, payload: bytes, wait: float = 5.0) -> tuple[str, float]:
    """Send one malformed request; (what came back, seconds)."""
    started = time.monotonic()
    try:
        reader, writer = await _connect(port)
    except (OSError, TimeoutError) as exc:
        return f"connect failed: {exception_kind(exc)}", 0.0
    read = asyncio.ensure_future(reader.read(65536))
    try:
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(payload)
            await writer.drain()
        await asyncio.wait([read], timeout=wait)
        took = time.monotonic() - started
        if not read.done():
            return f"no answer in {wait:g} s", took
        return await _read_answer(read), took
    finally:
        read.cancel()
        writer.close()


class IdleConnections:
    """``count`` connections that send nothing, held until :meth:`close`."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.started = time.monotonic()
        self.outcomes: Counter[str] = Counter()
        self.open = 0
        self.opened = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    async def open_all(self) -> float:
        """Open them (200 at a time); seconds it took."""
        sem = asyncio.Semaphore(200)
        ready: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for _ in range(self.count):
            done: asyncio.Future[None] = loop.create_future()
            ready.append(done)
            self._tasks.append(asyncio.create_task(self._one(sem, done)))
        await asyncio.wait(ready, timeout=60)
        return time.monotonic() - self.started

    async def _one(self, sem: asyncio.Semaphore, done: asyncio.Future[None]) -> None:
        try:
            async with sem:
                reader, writer = await _connect(self.port)
        except (OSError, TimeoutError) as exc:
            self.outcomes[f"connect failed: {exception_kind(exc)}"] += 1
            done.set_result(None)
            return
        self.opened += 1
        self.open += 1
        done.set_result(None)
        self._writers.append(writer)
        read = asyncio.ensure_future(reader.read(65536))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([read, stop], return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                took = time.monotonic() - self.started
                self.outcomes[f"{await _read_answer(read)} (by {took:.0f} s)"] += 1
                self.open -= 1
        finally:
            read.cancel()
            stop.cancel()

    async def close(self) -> None:
        self.outcomes[f"still open at the end ({time.monotonic() - self.started:.0f} s)"] += (
            self.open
        )
        self._stop.set()
        await asyncio.wait(self._tasks, timeout=10)
        for writer in self._writers:
            writer.close()


def _spread(values: Sequence[float]) -> str:
    if not values:
        return ""
    return f"{min(values):.2f}-{max(values):.2f} s" if len(values) > 1 else f"{values[0]:.2f} s"


async def scenario_abusive(
    workdir: Path,
    duration: float = 20.0,
    idle: int = 5000,
    slow: int = 20,
    big_headers: int = 3,
    big_bodies: int = 2,
    chunked_bodies: int = 1,
) -> ScenarioResult:
    raise_nofile(idle + 1000)

    async def action(stack: Stack, run: Run) -> None:
        port = stack.port
        notes = run.result.notes
        rss_samples: list[int] = []
        sampling = asyncio.Event()

        async def sample_rss() -> None:
            while not sampling.is_set():
                rss_samples.append(stack.gateway_rss()[0])
                await asyncio.sleep(0.25)

        idlers = IdleConnections(port, idle)
        sampler = asyncio.create_task(sample_rss())
        took = await idlers.open_all()
        notes.append(f"idle connections: {idlers.opened} of {idle} opened in {took:.1f} s")
        # The other abusers start once the idle connections are all open.
        end = time.monotonic() + duration
        metrics = await stack.gateway_metrics()
        open_now = metric_values(metrics, "gateway_client_connections")
        if open_now:
            notes.append(
                f"gateway_client_connections with them open: {int(sum(open_now.values()))}"
            )
        slow_tasks = [asyncio.create_task(slowloris(port, max(1.0, end - time.monotonic())))
                      for _ in range(slow)]  # fmt: skip

        async def malformed_loop() -> dict[str, list[tuple[str, float]]]:
            seen: dict[str, list[tuple[str, float]]] = {k: [] for k in MALFORMED}
            while time.monotonic() < end - 1:
                for kind, payload in MALFORMED.items():
                    seen[kind].append(await malformed(port, payload))
                await asyncio.sleep(0.05)
            return seen

        async def spaced(make: Callable[[], Awaitable[str]], count: int) -> list[str]:
            out = []
            for i in range(count):
                out.append(await make())
                gap = (end - time.monotonic() - 2) / max(1, count - i)
                await asyncio.sleep(max(0.0, min(gap, 3.0)))
            return out

        bad = asyncio.create_task(malformed_loop())
        headers = asyncio.create_task(spaced(lambda: big_header(port), big_headers))
        bodies = asyncio.create_task(spaced(lambda: big_body(port), big_bodies))
        chunked = asyncio.create_task(spaced(lambda: big_body(port, chunked=True), chunked_bodies))
        for outcome in await headers:
            notes.append(f"1 MB header: {outcome}")
        for outcome in await bodies:
            notes.append(f"100 MB body (Content-Length): {outcome}")
        for outcome in await chunked:
            notes.append(f"100 MB body (chunked): {outcome}")
        for kind, outcomes in (await bad).items():
            counts = Counter(o for o, _ in outcomes)
            times = [t for _, t in outcomes]
            notes.append(
                f"malformed, {kind}: "
                + ", ".join(f"{n}x {o}" for o, n in counts.most_common())
                + (f" (in {_spread(times)})" if times else "")
            )
        slow_outcomes = Counter(await asyncio.gather(*slow_tasks))
        notes.append(
            f"slowloris x{slow}: " + ", ".join(f"{n}x {o}" for o, n in slow_outcomes.most_common())
        )
        await sleep_until(end)
        await idlers.close()
        notes.append(
            f"idle connections x{idle}: "
            + ", ".join(f"{n}x {o}" for o, n in idlers.outcomes.most_common() if n)
        )
        sampling.set()
        await sampler
        metrics = await stack.gateway_metrics()
        cut = metric_values(metrics, "gateway_client_connections_cut_total")
        if cut:
            notes.append(
                "gateway_client_connections_cut_total: "
                + ", ".join(f"{_labels(k).get('reason', k)} {int(v)}" for k, v in cut.items())
            )
        if rss_samples:
            notes.append(
                f"gateway RSS sampled every 0.25 s: median "
                f"{statistics.median(rss_samples) / MIB:.0f} MB, "
                f"max {max(rss_samples) / MIB:.0f} MB"
            )

    return await run_scenario(
        workdir, 8, "abusive-clients",
        f"{duration:g} s beside {CLIENTS} keep-alive clients and 1 new-connection-per-request "
        f"client: {idle} idle connections, {slow} slowloris, {big_headers}x 1 MB header, "
        f"{big_bodies}x 100 MB body (declared) + {chunked_bodies}x chunked, malformed requests "
        "in a loop",
        two_versions({"1": 50, "2": 50}), action, fresh_clients=1, limit=duration + 180,
    )  # fmt: skip


def raise_nofile(needed: int) -> None:
    """Raise this process's open-file limit (inherited by the stack) to ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --- the whole set -----------------------------------------------------------------------------

Scenario = Callable[[Path], Awaitable[ScenarioResult]]


def full_set() -> dict[int, Scenario]:
    return {
        1: scenario_weights,
        2: scenario_blue_green,
        3: scenario_replica_kill,
        4: scenario_scale,
        5: scenario_controller_restart,
        6: scenario_redis_restart,
        7: scenario_hanging_shadow,
        8: scenario_abusive,
    }


def short_set() -> dict[int, Scenario]:
    """The brief versions the test suite runs (a few seconds each)."""

    async def weights(d: Path) -> ScenarioResult:
        return await scenario_weights(d, duration=4.0, interval=0.25)

    async def blue_green(d: Path) -> ScenarioResult:
        return await scenario_blue_green(d, cycles=5, pause=0.2)

    async def replica_kill(d: Path) -> ScenarioResult:
        return await scenario_replica_kill(d, duration=5.0, every=2.0)

    async def abusive(d: Path) -> ScenarioResult:
        return await scenario_abusive(d, duration=6.0, idle=5000, slow=5, big_headers=1,
                                      big_bodies=1, chunked_bodies=1)  # fmt: skip

    return {1: weights, 2: blue_green, 3: replica_kill, 8: abusive}


async def run_all(
    scenarios: Mapping[int, Scenario], workdir: Path, echo: bool = True
) -> list[ScenarioResult]:
    results = []
    for number, scenario in scenarios.items():
        if echo:
            print(f"soak: scenario {number} …", file=sys.stderr, flush=True)
        result = await scenario(workdir)
        if echo:
            print(f"soak: scenario {number} ({result.name}): sent {result.sent}, failed "
                  f"{result.failed}, killed in flight {result.killed_in_flight}"
                  + (f", ERROR {result.error.splitlines()[0]}" if result.error else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
        results.append(result)
    return results


def orphans(workdir: Path) -> list[int]:
    """Replica processes of this run still alive (there should be none)."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        pid = int(pid_dir.name)
        ours = _environ(pid).get("SOAK_DIR", "").startswith(str(workdir))
        if REPLICA_FLAG in _cmdline(pid) and ours and not _zombie(pid):
            found.append(pid)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if list(argv) == [REPLICA_FLAG]:
        serve_replica()
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.soak",
        description="Soak and fault-injection scenarios against a real controller, gateway "
        "and replicas on 127.0.0.1. Prints a Markdown table and ends with "
        "'RESULT soak failed=<n> sent=<n>'.",
    )
    parser.add_argument("--only", default="", metavar="N,N",
                        help="run only these scenarios (1-8)")  # fmt: skip
    parser.add_argument("--short", action="store_true",
                        help="the brief versions the test suite runs (1, 2, 3, 8)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep logs and state here")
    args = parser.parse_args(argv)
    scenarios = short_set() if args.short else full_set()
    if args.only:
        wanted = {int(n) for n in args.only.split(",") if n.strip()}
        unknown = wanted - set(scenarios)
        if unknown:
            parser.error(f"no scenario {sorted(unknown)} in this set ({sorted(scenarios)})")
        scenarios = {n: s for n, s in scenarios.items() if n in wanted}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merlin-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: logs and state under {workdir}", file=sys.stderr, flush=True)
    import uvloop

    started = time.monotonic()
    try:
        results = uvloop.run(run_all(scenarios, workdir))
    finally:
        left = orphans(workdir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            print(f"soak: killed {len(left)} replica(s) left running", file=sys.stderr)
    print(report(results))
    ok = all(not r.error for r in results) and sum(r.failed for r in results) == 0
    if ok and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"(ran {time.monotonic() - started:.0f} s)", file=sys.stderr)
    else:
        print(f"(ran {time.monotonic() - started:.0f} s; logs in {workdir})", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
