"""The local runtime: each replica is a child process on this machine.

A replica is started under Merlin's custom model contract (``CARAML_HTTP_PORT`` on a free
loopback port — for UPI_V1 also ``CARAML_GRPC_PORT`` on another, which is the replica's
traffic address while probes and ``/metrics`` stay on HTTP — ``CARAML_MODEL_NAME``,
``CARAML_MODEL_VERSION``, ``CARAML_MODEL_FULL_NAME``, ``CARAML_ARTIFACT_LOCATION``,
``STORAGE_URI``), its output going to a log file. One supervising task per replica:

- readiness (``GET /v1/models/<full name>``) must pass before the replica is reported
  ready (and so joins the route table); a later failure reports it unready;
- liveness (``GET /``) failing three times in a row, or the process exiting, restarts it
  with exponential back-off;
- a version endpoint none of whose replicas becomes ready within its deadline fails,
  with the last exit code and the last lines of the log in the message; so does one
  whose replicas keep exiting at once before any was ever ready (a crash loop:
  ``crash_loop_exits`` exits, each within ``quick_exit_seconds`` of its start), without
  waiting for the deadline;
- a replica runs in its version's ``workdir`` (the deploying user's directory), so
  relative paths in its command mean what they meant where it was deployed from;
- scale-down and undeploy drain: the replica is reported draining (it leaves the route
  table), and only after ``drain_seconds`` gets SIGTERM, then SIGKILL after a grace.

Every replica is recorded under the state directory before it is started, and the
record is deleted only once nothing it names is alive, so replicas that outlive a
crashed supervisor — or several in a row — are found and stopped at a later start.
A record names the replica by a marker in its environment (``MERLIN_DP_REPLICA``),
which its processes keep through ``exec``, title changes and forks, and by its pid
and command line once it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import time
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from merlin_dp.common.aio import cancel_and_wait, raise_if_cancelling
from merlin_dp.common.files import atomic_write, process_cmdline
from merlin_dp.common.net import free_port
from merlin_dp.runtime import (
    DeploySpec,
    EventKind,
    OnEvent,
    ReplicaInfo,
    ReplicaState,
    RuntimeEvent,
)
from merlin_dp.runtime.logtail import log_tail

log = logging.getLogger("merlin_dp.runtime")

LOG_TAIL_LINES = 15
# Every process of a replica carries this in its environment, valued with the replica's
# own marker: what finds it after a crash, whatever its pid and command line became.
MARKER_ENV = "MERLIN_DP_REPLICA"
# The controller's secrets are no business of a replica's.
NOT_INHERITED = ("MERLIN_DP_TOKENS",)


@dataclass(frozen=True, slots=True)
class LocalTimings:
    probe_interval: float = 0.1
    liveness_interval: float = 2.0
    liveness_failures: int = 3
    drain_seconds: float = 2.0  # time for every gateway to drop the replica from its table
    stop_grace_seconds: float = 10.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    # A version never ready whose replicas exit this many times, each this soon after
    # its start, fails at once: a program that dies on start won't start on the tenth
    # try either, and waiting out the ready deadline only hides why.
    crash_loop_exits: int = 3
    quick_exit_seconds: float = 10.0


@dataclass(eq=False)
class _Replica:
    id: str
    log_path: Path
    index: int = 0  # unique in this runtime: ids, logs and pid records never collide
    port: int = 0  # traffic: HTTP, or gRPC for UPI_V1
    http_port: int = 0  # probes and /metrics (the traffic port unless UPI_V1)
    state: ReplicaState = "starting"
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    task: asyncio.Task[None] | None = None
    stopping: bool = False
    asked_at: float = field(default_factory=time.monotonic)  # when it was asked for
    ready_after: float | None = None  # seconds from asked_at to first ready
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)  # MARKER_ENV, every start

    def info(self) -> ReplicaInfo:
        pid = self.process.pid if self.process is not None else None
        metrics = f"127.0.0.1:{self.http_port}" if self.http_port != self.port else ""
        return ReplicaInfo(self.id, f"127.0.0.1:{self.port}", self.state, pid, self.restarts,
                           self.ready_after, metrics)  # fmt: skip


# How long after start-up a version with orphans but nothing deployed counts as dropped.
ORPHAN_SETTLE_SECONDS = 10.0


@dataclass(frozen=True)
class _Record:
    """A replica's record: what finds its processes, and where it is kept. Written before
    the replica starts (no pid yet) and again once it runs; deleted once nothing it names
    is alive. An earlier run's records are its orphans."""

    path: Path
    marker: str  # "" in records written before markers existed: pid and cmdline only
    pid: int | None
    cmdline: str
    started: str  # the pid's start time (/proc/<pid>/stat), "" if unknown
    key: str
    replica: str
    address: str


@dataclass(eq=False)
class _Version:
    spec: DeploySpec
    replicas: dict[str, _Replica] = field(default_factory=dict)
    ever_ready: bool = False
    failed: bool = False
    deadline_task: asyncio.Task[None] | None = None
    last_exit: str = ""
    quick_exits: int = 0  # exits soon after start, while never ready


class LocalRuntime:
    def __init__(
        self, state_dir: Path, on_event: OnEvent, timings: LocalTimings | None = None
    ) -> None:
        self.state_dir = state_dir
        self.logs_dir = state_dir / "logs"
        self.pids_dir = state_dir / "replicas"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event
        self.timings = timings or LocalTimings()
        self._versions: dict[str, _Version] = {}
        self._retiring: set[_Version] = set()  # undeployed or replaced, still stopping
        self._next_index = int(time.time() * 1000) % 1_000_000  # fresh per run
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[None]] = set()
        # An earlier run's replicas (reap_orphans): in the view while they serve, stopped
        # by close() if still alive.
        self._handing_over: list[_Record] = []
        self._orphans_serve = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- the Runtime interface ------------------------------------------------------

    async def deploy(self, spec: DeploySpec) -> None:
        old = self._versions.pop(spec.key, None)
        version = _Version(spec)
        self._versions[spec.key] = version
        for _ in range(spec.replicas):
            self._add_replica(version)
        version.deadline_task = asyncio.create_task(self._deadline(version))
        if old is not None:
            # Redeploy: the old replicas keep serving until the new generation is ready
            # (or has failed), then drain.
            self._retiring.add(old)
            self._spawn(self._replace(old, version))

    async def scale(self, key: str, replicas: int) -> None:
        version = self._versions.get(key)
        if version is None or version.failed:
            return
        live = [r for r in version.replicas.values() if not r.stopping]
        if replicas > len(live):
            for _ in range(replicas - len(live)):
                self._add_replica(version)
        elif replicas < len(live):
            # Stop the least useful first: starting ones, then the newest ready ones.
            order = {"starting": 0, "unready": 1, "ready": 2}
            victims = sorted(live, key=lambda r: (order.get(r.state, 0), -r.index))
            for replica in victims[: len(live) - replicas]:
                self._spawn(self._stop_replica(version, replica, drain=True))
        self._emit(key, "scaled", f"desired {replicas} replicas")
        version.spec = replace(version.spec, replicas=replicas)

    async def undeploy(self, key: str) -> None:
        """Start draining and stopping; returns at once. The stop is the runtime's own
        task, so a caller that goes away can't leave a replica half-stopped."""
        version = self._versions.pop(key, None)
        if version is not None:
            self._retiring.add(version)
            self._spawn(self._retire(version))

    async def _replace(self, old: _Version, new: _Version) -> None:
        while not new.failed and self._versions.get(new.spec.key) is new:
            ready = sum(1 for r in new.replicas.values() if r.state == "ready")
            if ready >= max(1, new.spec.replicas):
                break
            await asyncio.sleep(self.timings.probe_interval)
        await self._retire(old)

    def replicas(self, key: str) -> list[ReplicaInfo]:
        """Every replica with a live process, including those still draining away."""
        versions = [v for v in self._retiring if v.spec.key == key]
        current = self._versions.get(key)
        if current is not None:
            versions.append(current)
        infos = [r.info() for v in versions for r in v.replicas.values()]
        if self._orphans_serve:
            infos += [ReplicaInfo(o.replica, o.address, "ready", o.pid)
                      for o in self._handing_over if o.key == key and o.address]  # fmt: skip
        return infos

    def logs(self, key: str) -> list[str]:
        return [str(p) for p in log_files(self.logs_dir, key)]

    async def close(self) -> None:
        await cancel_and_wait(list(self._background))
        if self._handing_over:
            # Stopped before the hand-over finished: the earlier run's replicas go too.
            self._handing_over = await self._end(self._handing_over, grace=0)
        versions = [*self._versions.values(), *self._retiring]
        self._versions.clear()
        await asyncio.gather(*(self._retire(v, drain=False) for v in versions))
        # A stop interrupted half-way (its task cancelled) must not leave a process behind.
        for version in versions:
            for replica in version.replicas.values():
                if replica.process is not None and replica.process.returncode is None:
                    _signal(replica.process, signal.SIGKILL)
                    await replica.process.wait()
                await self._end([self._record(version, replica)], grace=0)
        if self._session is not None:
            await self._session.close()

    # --- orphans --------------------------------------------------------------------

    def reap_orphans(self) -> int:
        """Hand over from replicas an earlier run left alive (the controller was killed).

        Gateways still route to them with the last table they got, so they are not killed
        at once: they stay in this runtime's view as ready replicas of their version
        until every version this run deploys has its own replicas ready (or failed, or a
        minute passed); then they leave the view (gateways drop them from their tables),
        and after ``drain_seconds`` get SIGTERM, and SIGKILL after the stop grace.
        Their records stay until they are gone: a run killed during the hand-over leaves
        them to the next. Returns how many there were.
        """
        for leftover in self.pids_dir.glob(".*.tmp"):  # a write a crash cut short
            leftover.unlink(missing_ok=True)
        records: list[_Record] = []
        for path in sorted(self.pids_dir.glob("*.json")):
            try:
                records.append(_read_record(path))
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # names nothing it could find
        live = _live_pids(records)
        orphans = [r for r in records if live[r]]
        for record in records:
            if not live[record]:
                record.path.unlink(missing_ok=True)
        if orphans:
            log.warning("%d replica(s) left running by an earlier run serve until the new "
                        "ones are ready, then stop", len(orphans))  # fmt: skip
            self._handing_over = orphans
            self._orphans_serve = True
            self._spawn(self._hand_over(orphans))
        return len(orphans)

    async def _hand_over(self, orphans: list[_Record], limit: float = 60.0) -> None:
        keys = {o.key for o in orphans if o.key and o.address}
        started = time.monotonic()
        while time.monotonic() - started < limit:
            if all(self._taken_over(key, time.monotonic() - started) for key in keys):
                break
            await asyncio.sleep(self.timings.probe_interval)
        self._orphans_serve = False
        for key in keys:  # out of the view: gateways drop them, then they stop
            self._emit(key, "replica_unready", "an earlier run's replicas hand over")
        await asyncio.sleep(self.timings.drain_seconds)
        self._handing_over = await self._end(orphans, grace=self.timings.stop_grace_seconds)
        log.info("stopped %d replica(s) left running by an earlier run", len(orphans))

    async def _end(self, records: Sequence[_Record], grace: float) -> list[_Record]:
        """Stop every process the records name — SIGTERM, and SIGKILL after ``grace``
        (at once when 0) — and delete each record once nothing it names is alive.
        Returns the records whose processes outlived it all (kept for a later try)."""
        live = await asyncio.to_thread(_live_pids, records)
        if grace > 0:
            _signal_pids((p for pids in live.values() for p in pids), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(live.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            live = await asyncio.to_thread(_live_pids, records)
        # SIGKILL can't be refused, but a process in the kernel (D state) dies later:
        # look a few seconds, and keep the records of any that haven't.
        for _ in range(50):
            if not any(live.values()):
                break
            _signal_pids((p for pids in live.values() for p in pids), signal.SIGKILL)
            await asyncio.sleep(0.1)
            live = await asyncio.to_thread(_live_pids, records)
        for record, pids in live.items():
            if pids:
                log.warning("replica %s (pids %s) outlived SIGKILL; its record stays for the "
                            "next start", record.replica, sorted(pids))  # fmt: skip
            else:
                record.path.unlink(missing_ok=True)
        return [r for r, pids in live.items() if pids]

    def _taken_over(self, key: str, waited: float) -> bool:
        """This run serves ``key`` now (or never will: failed, or not deployed at all once
        the controller had time to start what its state says)."""
        version = self._versions.get(key)
        if version is None:
            return waited > ORPHAN_SETTLE_SECONDS
        ready = sum(r.state == "ready" for r in version.replicas.values())
        return version.failed or ready >= max(1, version.spec.replicas)

    # --- one replica ----------------------------------------------------------------

    def _add_replica(self, version: _Version) -> _Replica:
        spec = version.spec
        rid = ""
        while not rid or (self.pids_dir / f"{rid}.json").exists():
            # An earlier run's record may still name this id: never write over it.
            self._next_index += 1
            rid = f"{spec.full_name}-{self._next_index}"
        index = self._next_index
        log_path = self.logs_dir / f"{spec.key.replace('/', '_')}-{index}.log"
        replica = _Replica(rid, log_path, index)
        version.replicas[rid] = replica
        replica.task = asyncio.create_task(self._supervise(version, replica))
        return replica

    async def _supervise(self, version: _Version, replica: _Replica) -> None:
        t = self.timings
        failures = 0
        while not replica.stopping and not version.failed:
            started = time.monotonic()
            try:
                await self._start_process(version, replica)
            except OSError as exc:
                version.last_exit = f"could not start {version.spec.command[0]!r}: {exc}"
                self._emit(version.spec.key, "replica_exited", version.last_exit, replica.id)
            else:
                await self._watch(version, replica)
            if replica.stopping or version.failed:
                break
            ran = time.monotonic() - started
            if not version.ever_ready and ran < t.quick_exit_seconds:
                version.quick_exits += 1
                if version.quick_exits >= t.crash_loop_exits:
                    self._crash_loop(version, replica)
                    break
            if ran > 30:
                failures = 0  # it ran a good while: start the back-off afresh
            delay = min(t.backoff_base * 2**failures, t.backoff_max)
            failures += 1
            replica.restarts += 1
            replica.state = "starting"
            await asyncio.sleep(delay)

    async def _start_process(self, version: _Version, replica: _Replica) -> None:
        spec = version.spec
        replica.port = free_port()
        replica.http_port = free_port() if spec.protocol == "UPI_V1" else replica.port
        ports = {"CARAML_HTTP_PORT": str(replica.http_port)}
        if spec.protocol == "UPI_V1":
            ports["CARAML_GRPC_PORT"] = str(replica.port)
        env = {
            **{k: v for k, v in os.environ.items() if k not in NOT_INHERITED},
            **spec.env,
            **ports,
            MARKER_ENV: replica.marker,
            "CARAML_MODEL_NAME": spec.model,
            "CARAML_MODEL_VERSION": spec.version,
            "CARAML_MODEL_FULL_NAME": spec.full_name,
            "CARAML_ARTIFACT_LOCATION": spec.artifact,
            "STORAGE_URI": spec.artifact,
        }
        if spec.workdir and not await asyncio.to_thread(os.path.isdir, spec.workdir):
            raise NotADirectoryError(f"its working directory {spec.workdir} does not exist here")
        where = f" in {spec.workdir}" if spec.workdir else ""
        # Recorded before it exists, so no crash can leave it running unrecorded: a start
        # finds it by its marker even if its pid never made it into the record.
        self._write_record(version, replica, None)
        with replica.log_path.open("ab") as out:
            out.write(
                f"--- starting {shlex.join(spec.command)}{where} on port {replica.port}\n".encode()
            )
            out.flush()
            replica.process = await asyncio.create_subprocess_exec(
                *spec.command,
                cwd=spec.workdir or None,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        pid = replica.process.pid
        try:
            self._write_record(version, replica, pid)
        except OSError as exc:  # the record written before the start still finds it
            log.warning("replica %s: could not record its pid: %s", replica.id, exc)
        replica.state = "starting"
        self._emit(spec.key, "replica_started", f"pid {pid} on port {replica.port}", replica.id)

    async def _watch(self, version: _Version, replica: _Replica) -> None:
        """From start to exit: readiness, then liveness; returns when the process is gone."""
        t = self.timings
        proc = replica.process
        assert proc is not None
        spec = version.spec
        ready_url = f"http://127.0.0.1:{replica.http_port}/v1/models/{spec.full_name}"
        live_url = f"http://127.0.0.1:{replica.http_port}/"
        exited = asyncio.ensure_future(proc.wait())
        try:
            while not exited.done() and not replica.stopping:
                if await self._probe(ready_url):
                    break
                await asyncio.wait([exited], timeout=t.probe_interval)
            if not exited.done() and not replica.stopping:
                replica.state = "ready"
                if replica.ready_after is None:
                    replica.ready_after = time.monotonic() - replica.asked_at
                version.ever_ready = True
                self._emit(spec.key, "replica_ready", replica.info().address, replica.id)
            misses = 0
            while not exited.done() and not replica.stopping:
                await asyncio.wait([exited], timeout=t.liveness_interval)
                if exited.done() or replica.stopping:
                    break
                if not await self._probe(live_url):
                    misses += 1
                    if misses >= t.liveness_failures:
                        self._emit(spec.key, "replica_unready", "liveness failed", replica.id)
                        replica.state = "unready"
                        _signal(proc, signal.SIGKILL)
                        break
                    continue
                misses = 0
                ready = await self._probe(ready_url)
                if ready and replica.state == "unready":
                    replica.state = "ready"
                    self._emit(spec.key, "replica_ready", replica.info().address, replica.id)
                elif not ready and replica.state == "ready":
                    replica.state = "unready"
                    self._emit(spec.key, "replica_unready", "readiness failed", replica.id)
            code = await exited
        finally:
            if not exited.done():
                exited.cancel()
        if replica.stopping:
            return
        was_ready = replica.state == "ready"
        replica.state = "starting"
        version.last_exit = _exit_reason(code)
        if was_ready:
            self._emit(spec.key, "replica_unready", "process exited", replica.id)
        self._emit(spec.key, "replica_exited", version.last_exit, replica.id)

    async def _probe(self, url: str) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        try:
            async with self._session.get(url) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            raise_if_cancelling()
            return False

    async def _deadline(self, version: _Version) -> None:
        await asyncio.sleep(version.spec.ready_deadline_s)
        if (
            version.ever_ready
            or version.failed
            or self._versions.get(version.spec.key) is not version
        ):
            return
        version.failed = True
        newest = max(version.replicas.values(), key=lambda r: r.index, default=None)
        tail = _tail_text(newest.log_path) if newest is not None else ""
        reason = version.last_exit or "the readiness check never passed"
        message = (
            f"no replica became ready within {version.spec.ready_deadline_s:g} s "
            f"({reason}); last log lines:\n{tail}"
        )
        await self._fail(version, message)

    def _crash_loop(self, version: _Version, replica: _Replica) -> None:
        """Fail a version whose replicas exit at once; called from a replica's own
        supervising task, which the stop must not cancel, so the rest runs apart."""
        version.failed = True  # no replica restarts from here on
        t = self.timings
        message = (
            f"crash loop: {version.quick_exits} replica starts ended within "
            f"{t.quick_exit_seconds:g} s each and none became ready "
            f"(last: {version.last_exit}); last log lines:\n{_tail_text(replica.log_path)}"
        )
        self._spawn(self._fail(version, message))

    async def _fail(self, version: _Version, message: str) -> None:
        await self._retire(version, drain=False)
        if self._versions.get(version.spec.key) is version:  # not replaced meanwhile
            self._emit(version.spec.key, "failed", message)

    async def _retire(self, version: _Version, drain: bool = True) -> None:
        if (
            version.deadline_task is not None
            and version.deadline_task is not asyncio.current_task()
        ):
            version.deadline_task.cancel()
        self._retiring.add(version)
        try:
            await asyncio.gather(
                *(self._stop_replica(version, r, drain) for r in list(version.replicas.values()))
            )
        finally:
            if not version.replicas:
                self._retiring.discard(version)

    async def _stop_replica(self, version: _Version, replica: _Replica, drain: bool) -> None:
        if replica.stopping:
            return
        replica.stopping = True
        key = version.spec.key
        if drain and replica.state == "ready":
            replica.state = "draining"
            self._emit(key, "replica_unready", "draining", replica.id)
            await asyncio.sleep(self.timings.drain_seconds)
        proc = replica.process
        grace_ends = time.monotonic() + self.timings.stop_grace_seconds
        if proc is not None and proc.returncode is None:
            _signal(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.timings.stop_grace_seconds)
            except TimeoutError:
                raise_if_cancelling()
                _signal(proc, signal.SIGKILL)
                await proc.wait()
        if replica.task is not None and replica.task is not asyncio.current_task():
            replica.task.cancel()
            # wait() doesn't raise the task's own CancelledError, and lets ours through.
            await asyncio.wait([replica.task])
        # Whatever else carries its marker (children that left its group, a start the
        # cancelled task had under way) gets the rest of the grace; only then does the
        # record go.
        await self._end([self._record(version, replica)], max(0.0, grace_ends - time.monotonic()))
        replica.state = "stopped"
        version.replicas.pop(replica.id, None)
        self._emit(key, "replica_stopped", "", replica.id)

    def _record(self, version: _Version, replica: _Replica) -> _Record:
        pid = replica.process.pid if replica.process is not None else None
        return _Record(self.pids_dir / f"{replica.id}.json", replica.marker, pid, "", "",
                       version.spec.key, replica.id, f"127.0.0.1:{replica.port}")  # fmt: skip

    def _write_record(self, version: _Version, replica: _Replica, pid: int | None) -> None:
        # Synchronous on purpose: a write finishing in a thread after the replica's stop
        # had deleted the record would bring it back.
        record = {"marker": replica.marker, "pid": pid,
                  "cmdline": process_cmdline(pid) if pid is not None else "",
                  "started": _start_time(pid) if pid is not None else "",
                  "replica": replica.id, "key": version.spec.key,
                  "address": f"127.0.0.1:{replica.port}"}  # fmt: skip
        atomic_write(self.pids_dir / f"{replica.id}.json", json.dumps(record).encode())

    def _emit(self, key: str, kind: EventKind, message: str = "", replica: str = "") -> None:
        try:
            self.on_event(RuntimeEvent(key, kind, message, replica))
        except Exception:
            log.exception("runtime event handler failed")


def log_files(logs_dir: Path, key: str) -> list[Path]:
    """A version endpoint's replica logs, oldest first (the API's ``…/logs`` reads these)."""
    files = logs_dir.glob(key.replace("/", "_") + "-*.log")
    return sorted(files, key=lambda p: p.stat().st_mtime)


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _read_record(path: Path) -> _Record:
    data = json.loads(path.read_text())
    pid = data.get("pid")
    return _Record(path, str(data.get("marker", "")), None if pid is None else int(pid),
                   str(data.get("cmdline", "")), str(data.get("started", "")),
                   str(data.get("key", "")),
                   str(data.get("replica", "")), str(data.get("address", "")))  # fmt: skip


def _live_pids(records: Sequence[_Record]) -> dict[_Record, set[int]]:
    """The live processes each record names: every process carrying its marker (one
    pass over /proc for all of them), and its recorded pid if that is still the
    replica. Zombies count as gone."""
    needles = {f"{MARKER_ENV}={r.marker}".encode(): r.marker for r in records if r.marker}
    marked: dict[str, set[int]] = {}
    if needles:
        prefix = f"{MARKER_ENV}=".encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            env = _environ(int(entry.name))
            if not env or prefix not in env:
                continue
            for var in env.split(b"\0"):
                if var in needles:
                    marked.setdefault(needles[var], set()).add(int(entry.name))
    live: dict[_Record, set[int]] = {}
    for record in records:
        pids = set(marked.get(record.marker, ())) if record.marker else set()
        if record.pid is not None and record.pid not in pids and _still_it(record):
            pids.add(record.pid)
        live[record] = pids
    return live


def _still_it(record: _Record) -> bool:
    """Whether the recorded pid is still the replica, for processes whose environment
    can't say: a record from before markers, or an environment we may not read (a
    process that made itself non-dumpable). Then, as before markers, by command line:
    a reused pid or a zombie has another."""
    assert record.pid is not None
    if record.started:
        # A pid with the recorded start time is the same process, whatever its
        # environment and command line read now: a replica that sets its process title
        # (nginx, PostgreSQL, setproctitle) overwrites both.
        return _start_time(record.pid) == record.started
    if record.marker:
        try:
            Path(f"/proc/{record.pid}/environ").read_bytes()
            return False  # readable, and the scan found no marker in it
        except PermissionError:
            pass
        except OSError:
            return False
    return bool(record.cmdline) and process_cmdline(record.pid) == record.cmdline


def _start_time(pid: int) -> str:
    """When the process started, in clock ticks since boot ("" if gone or a zombie): with
    the pid, it names one process for the life of the machine."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count after its end.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":
        return ""
    return fields[19].decode()  # field 22, starttime


def _environ(pid: int) -> bytes:
    """A process's initial environment ("" if gone, a zombie, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    """Signal each process and the group it leads (a replica leads its own session, so
    a child that dropped the marker from its environment still goes)."""
    for pid in set(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _tail_text(path: Path) -> str:
    return "\n".join(log_tail(path, LOG_TAIL_LINES)[0])


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
