"""The stack a soak scenario runs against, on 127.0.0.1: ``merlin-dp controller`` (file or
Redis store, local runtime, the autoscaler when asked), one ``merlin-dp gateway`` process
following it, redis-server when asked, and the replicas the controller starts; with the
controller's API and the gateway's stable URL as the scenarios use them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.harness.errors import HarnessError
from loadtests.harness.ports import wait_for_port_async
from loadtests.harness.processes import ChildProcess
from loadtests.harness.procfs import gone_or_zombie, status_bytes
from loadtests.harness.systems import REPO_ROOT, controller_argv, gateway_argv, redis_argv
from loadtests.harness.tools import ensure_tools
from loadtests.soak.replica import replica_command, replica_dir_of
from merlin_dp.common.net import LOOPBACK, free_ports

PROJECT, MODEL = "soak", "scorer"
HOST = f"{MODEL}.{PROJECT}.localhost"
MODEL_BASE = f"/v1/projects/{PROJECT}/models/{MODEL}"
PAYLOAD = b'{"instances": [[1.0, 2.0, 3.0]]}'
# Each replica takes this long per predict: requests are in flight on it when it is killed.
DELAY_MS = 10.0
STARTUP_TIMEOUT_S = 60.0
MIB = 1024 * 1024


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


class Stack:
    """Controller, gateway, (Redis) and replicas on 127.0.0.1, for one scenario."""

    def __init__(self, workdir: Path, plan: StackPlan) -> None:
        self.workdir = workdir
        self.plan = plan
        self.replica_dir = workdir / "replicas"
        self.replica_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = workdir / "state"
        self.controller_port, self.port, self.admin_port, self.redis_port = free_ports(4)
        self.controller: ChildProcess | None = None
        self.gateway: ChildProcess | None = None
        self.redis: ChildProcess | None = None
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
            raise HarnessError(f"setting the rule: {status} {body}")
        feed = ["--redis", self.redis_url] if self.plan.redis else ["--controller", self.api]
        self.gateway = self._start(
            "gateway",
            gateway_argv(feed, self.port, self.admin_port, ["--shutdown-seconds", "2"]),
            self.workdir / "gateway.log",
        )
        await self._wait_port(self.port, self.gateway)
        await self.wait_serving(self.plan.serving)
        return self

    async def start_redis(self) -> None:
        try:
            binary = ensure_tools(["redis-server"])["redis-server"]
        except HarnessError as exc:
            raise HarnessError(f"redis-server is needed: {exc}") from None
        data = self.workdir / "redis"
        data.mkdir(exist_ok=True)
        self._redis_starts += 1
        self.redis = self._start(
            "redis",
            redis_argv(binary, self.redis_port, data),
            self.workdir / f"redis-{self._redis_starts}.log",
        )
        await self._wait_port(self.redis_port, self.redis)

    async def start_controller(self) -> None:
        extra: list[str] = []
        if self.plan.redis:
            extra += ["--store", self.redis_url]
        if self.plan.autoscale:
            extra += ["--gateway-admin", f"http://{LOOPBACK}:{self.admin_port}",
                      "--stable-window", "6", "--scale-down-delay", "3"]  # fmt: skip
        self._controller_starts += 1
        self.controller = self._start(
            "controller",
            controller_argv(self.controller_port, self.state_dir, extra),
            self.workdir / f"controller-{self._controller_starts}.log",
        )
        await self._wait_port(self.controller_port, self.controller)

    @staticmethod
    def _start(name: str, argv: list[str], log: Path) -> ChildProcess:
        return ChildProcess(name, argv, log_path=log, cwd=REPO_ROOT)

    @staticmethod
    async def _wait_port(port: int, proc: ChildProcess) -> None:
        await wait_for_port_async(LOOPBACK, port, within=STARTUP_TIMEOUT_S, proc=proc)

    async def stop(self) -> None:
        """Stop everything, newest first; then kill any replica still running, and say so."""
        for child in (self.gateway, self.controller, self.redis):
            if child is not None:
                await child.stop_async()
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
        return [pid for pid, _ in self.replica_processes() if not gone_or_zombie(pid)]

    def replica_processes(self) -> list[tuple[int, int]]:
        """(pid, port) of every replica of this stack still running."""
        found = []
        for log in self.replica_dir.glob("received-*-*.log"):
            _, pid_text, port_text = log.stem.split("-")
            pid, port = int(pid_text), int(port_text)
            if replica_dir_of(pid) == str(self.replica_dir):
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
            "command": replica_command(),
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
            raise HarnessError(f"deploying version {version}: {status} {body}")

    async def wait_version(self, version: str, within: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + within
        while True:
            assert self.controller is not None
            self.controller.check_alive(f"deploying version {version}")
            status, body = await self.call("GET", f"/versions/{version}/endpoint")
            if status == 200 and body["status"] in ("running", "serving") and body["replicas"]:
                return
            if status == 200 and body["status"] == "failed":
                raise HarnessError(f"version {version} failed: {body['message']}")
            if time.monotonic() > deadline:
                raise HarnessError(f"version {version} not running after {within:g} s: {body}")
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
            self.gateway.check_alive(f"waiting for version {version} to serve")
            try:
                last = await self.predict()
                if last == (200, version):
                    return time.monotonic() - started
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
        raise HarnessError(f"gateway not serving version {version} after {within:g} s: {last}")

    def gateway_rss(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the gateway process, bytes (0 once it is gone)."""
        assert self.gateway is not None
        pid = self.gateway.pid
        return status_bytes(pid, "VmRSS") or 0, status_bytes(pid, "VmHWM") or 0

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
