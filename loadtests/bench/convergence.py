"""The convergence benchmark, ``python -m loadtests.bench convergence``: time from an
accepted route change until every gateway serves it.

Not a comparison and not pinned (it times propagation, not CPU): a controller (local
runtime) runs fraud/scorer versions 1 and 2 from ``examples/custom_model.py`` with 100% to
version 1, and ``--gateways`` (4) gateway processes, one worker each, follow it; then
``--changes`` (50) changes alternate ``endpoint:switch`` and ``endpoint:rollback``. The
clock starts when a call returns 200 (its send time is kept too); every gateway is then
probed concurrently, each from its own thread over a kept-alive connection, with predict
requests back to back until ``X-Model-Version`` names the new version: that answer's
arrival is the gateway's convergence time, and the slowest gateway's is the change's.
Feed modes (``--feed``): the controller's route-table stream, and Redis (a private
redis-server; controller ``--store``, gateways ``--redis``). Ends with
``RESULT convergence gateways=<n> p99_ms=<worst p99> controller_p99_ms=<ms>
redis_p99_ms=<ms>``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests.bench.options import non_negative_int, positive_int
from loadtests.harness.errors import HarnessError
from loadtests.harness.measure import busy_machine, percentile
from loadtests.harness.ports import (
    STARTUP_TIMEOUT_S,
    http_get,
    wait_for_http_ok,
    wait_for_port,
)
from loadtests.harness.processes import (
    ChildProcess,
    controller_replicas_stopped,
    managed_processes,
)
from loadtests.harness.procfs import descendants
from loadtests.harness.routes import weighted_rule
from loadtests.harness.systems import REPO_ROOT, controller_argv, gateway_argv, redis_argv
from loadtests.harness.tables import fmt_number, format_row, format_table, goal_mark
from loadtests.harness.tools import ensure_tools
from merlin_dp.common.net import LOOPBACK, free_ports

CONVERGENCE_PROJECT = "fraud"
CONVERGENCE_MODEL = "scorer"
CONVERGENCE_VERSIONS = ("1", "2")
CONVERGENCE_HOST = f"{CONVERGENCE_MODEL}.{CONVERGENCE_PROJECT}.localhost"
CONVERGENCE_BODY = '{"instances": [[1, 2]]}'
VERSION_HEADER = "X-Model-Version"
FEED_CONTROLLER = "controller"
FEED_REDIS = "redis"
FEED_MODES = (FEED_CONTROLLER, FEED_REDIS)
DEFAULT_CHANGES = 50
DEFAULT_GATEWAYS = 4
# Idle time between one change reaching every gateway and the next change.
DEFAULT_CHANGE_PAUSE_MS = 100
# A gateway that hasn't served a change after this long is recorded as never (inf).
DEFAULT_CHANGE_TIMEOUT_S = 10.0
REPLICA_READY_DEADLINE_S = 60
# The replica the controller runs for both versions (honours the replica contract).
CUSTOM_MODEL = REPO_ROOT / "examples" / "custom_model.py"
# The goal, reported and never asserted: p99 under 1 s with 4 gateway processes.
CONVERGENCE_GOAL_P99_MS = 1000.0
CONVERGENCE_GOAL_GATEWAYS = 4
# With fewer changes than this, the nearest-rank p99 is the slowest change; flag it when
# it is this many times the median.
P99_IS_MAX_BELOW = 100
OUTLIER_FACTOR = 5.0


# --- talking to the controller and the gateways ---------------------------------------


class KeepAliveClient:
    """HTTP/1.1 exchanges with one server on 127.0.0.1 over one kept-alive connection.

    Not thread-safe: one thread at a time. A kept-alive connection the server closed while
    idle is reopened once, silently but counted in `reconnects`."""

    def __init__(self, port: int, *, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.reconnects = 0
        self._conn: http.client.HTTPConnection | None = None

    def exchange(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request; (status, response headers, response body)."""
        if self._conn is not None:
            try:
                return self._exchange(self._conn, method, path, body, headers)
            except ConnectionError:  # RemoteDisconnected included
                self.reconnects += 1
        self._conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=self.timeout)
        return self._exchange(self._conn, method, path, body, headers)

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        try:
            # Headers and a bytes body leave in one send(): no Nagle/delayed-ACK stall.
            conn.request(method, path, body=body, headers=dict(headers))
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, response.msg, data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ControllerClient:
    """The controller's JSON API for one model, over a kept-alive connection."""

    def __init__(self, port: int, project: str, model: str) -> None:
        self.port = port
        self.base = f"/v1/projects/{project}/models/{model}"
        self._client = KeepAliveClient(port, timeout=30.0)

    def call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, Any]:
        """(status, parsed JSON body or its text); `path` is relative to the model's base."""
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            status, _, raw = self._client.exchange(method, self.base + path, data, headers)
        except (OSError, http.client.HTTPException) as exc:
            raise HarnessError(
                f"{method} {self.base}{path} on the controller failed: {exc}"
            ) from exc
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return status, parsed

    def expect(
        self, method: str, path: str, body: Mapping[str, Any] | None, statuses: Sequence[int]
    ) -> Any:
        """`call`, raising HarnessError unless the status is one of `statuses`."""
        status, parsed = self.call(method, path, body)
        if status not in statuses:
            raise HarnessError(f"{method} {self.base}{path} answered {status}: {parsed}")
        return parsed

    def close(self) -> None:
        self._client.close()


def custom_version_spec(ready_deadline_seconds: float = REPLICA_READY_DEADLINE_S) -> dict[str, Any]:
    """A version endpoint running examples/custom_model.py with this interpreter."""
    return {
        "type": "custom",
        "command": [sys.executable, str(CUSTOM_MODEL)],
        "ready_deadline_seconds": ready_deadline_seconds,
    }


def deploy_and_wait(
    control: ControllerClient,
    versions: Sequence[str],
    *,
    controller: ChildProcess,
    timeout: float = REPLICA_READY_DEADLINE_S + 15.0,
) -> None:
    """Deploy `versions` (custom_model.py) and wait until the controller says each runs."""
    for version in versions:
        control.expect("PUT", f"/versions/{version}/endpoint", custom_version_spec(),
                       (200, 201, 202))  # fmt: skip
    deadline = time.monotonic() + timeout
    pending = list(versions)
    while pending:
        controller.check_alive(f"deploying versions {', '.join(pending)}")
        for version in list(pending):
            record = control.expect("GET", f"/versions/{version}/endpoint", None, (200,))
            status = record.get("status") if isinstance(record, dict) else None
            if status in ("running", "serving"):
                pending.remove(version)
            elif status in ("failed", "terminated"):
                raise HarnessError(f"version {version} {status}: {record.get('message', '')}")
        if pending and time.monotonic() > deadline:
            raise HarnessError(f"versions {', '.join(pending)} not running after {timeout:.0f}s")
        if pending:
            time.sleep(0.2)


def served_version(rule: Mapping[str, Any]) -> str:
    """The version taking the most traffic under a model-endpoint `rule`."""
    destinations = rule.get("destinations") or []
    if not destinations:
        raise HarnessError(f"rule without destinations: {rule}")
    return str(max(destinations, key=lambda d: d.get("weight", 0))["version"])


def gateway_revision(admin_port: int) -> int | None:
    """The route-table revision the gateway's (first) worker serves, from /readyz."""
    try:
        status, body = http_get(LOOPBACK, admin_port, "/readyz", timeout=2.0)
        workers = json.loads(body).get("workers") or []
        revision = workers[0].get("revision") if status == 200 else None
    except (OSError, ValueError, AttributeError, IndexError):
        return None
    return int(revision) if isinstance(revision, int) else None


def controller_revision(port: int) -> int | None:
    """The controller's state revision, from /healthz."""
    try:
        status, body = http_get(LOOPBACK, port, "/healthz", timeout=2.0)
        revision = json.loads(body).get("revision") if status == 200 else None
    except (OSError, ValueError, AttributeError):
        return None
    return int(revision) if isinstance(revision, int) else None


@dataclass(frozen=True)
class ProbeOutcome:
    """Probing one gateway for one change."""

    arrived: float | None  # perf_counter() at the first answer from the new version
    probes: int
    errors: int  # non-200 answers and failed exchanges
    last_error: str


class GatewayProber:
    """Real predict requests to one gateway's model endpoint over one kept-alive connection."""

    def __init__(self, name: str, port: int, admin_port: int, host: str = CONVERGENCE_HOST) -> None:
        self.name = name
        self.port = port
        self.admin_port = admin_port
        self._client = KeepAliveClient(port)
        self._headers = {"Host": host, "Content-Type": "application/json"}
        self._body = CONVERGENCE_BODY.encode()

    @property
    def reconnects(self) -> int:
        return self._client.reconnects

    def predict(self, host: str | None = None) -> tuple[int, str | None]:
        """One predict request; (status, X-Model-Version)."""
        headers = self._headers if host is None else {**self._headers, "Host": host}
        status, response_headers, _ = self._client.exchange(
            "POST", "/v1/predict", self._body, headers
        )
        return status, response_headers.get(VERSION_HEADER)

    def probe_until(
        self, version: str, deadline: float, stop: threading.Event, pause_s: float = 0.0
    ) -> ProbeOutcome:
        """Predict back to back until an answer comes from `version`, `deadline`
        (perf_counter) passes or `stop` is set."""
        probes = errors = 0
        last_error = ""
        while not stop.is_set() and time.perf_counter() < deadline:
            probes += 1
            try:
                status, served = self.predict()
            except (OSError, http.client.HTTPException) as exc:
                errors += 1
                last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.001)  # don't spin on a refused connection
                continue
            arrived = time.perf_counter()
            if status != 200:
                errors += 1
                last_error = f"status {status}"
            elif served == version:
                return ProbeOutcome(arrived, probes, errors, last_error)
            if pause_s > 0:
                time.sleep(pause_s)
        return ProbeOutcome(None, probes, errors, last_error)

    def close(self) -> None:
        self._client.close()


def wait_until_serving(
    prober: GatewayProber, version: str, *, timeout: float = STARTUP_TIMEOUT_S
) -> None:
    """Wait until the gateway's model endpoint answers 200 from `version`."""
    outcome = prober.probe_until(version, time.perf_counter() + timeout, threading.Event(), 0.05)
    if outcome.arrived is None:
        raise HarnessError(
            f"{prober.name} not serving version {version} of {CONVERGENCE_HOST} after "
            f"{timeout:.0f}s (last error: {outcome.last_error or 'none'})"
        )


# --- the benchmark --------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeResult:
    """One accepted change and when each gateway first served it."""

    index: int
    action: str  # "switch" or "rollback"
    version: str  # the version the new rule serves
    revision: int  # the model endpoint's rule revision after the change
    api_ms: float  # from sending the API call to its 200
    gateway_ms: list[float]  # per gateway: from the 200 to its first answer from `version`
    probes: list[int]
    errors: list[int]

    @property
    def every_ms(self) -> float:
        """From the 200 until every gateway served the change (inf if one never did)."""
        return max(self.gateway_ms)


@dataclass
class FeedRun:
    """The convergence benchmark with one feed mode."""

    mode: str
    gateways: int
    changes: list[ChangeResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def every_ms(self) -> list[float]:
        return sorted(c.every_ms for c in self.changes)

    def p99_ms(self) -> float:
        return percentile(self.every_ms(), 99)


@dataclass(frozen=True)
class ConvergenceSettings:
    changes: int
    gateways: int
    pause_s: float
    probe_pause_s: float
    timeout_s: float
    gateway_args: Sequence[str]


def measure_changes(
    control: ControllerClient,
    probers: Sequence[GatewayProber],
    settings: ConvergenceSettings,
    run: FeedRun,
) -> None:
    """Alternate switch and rollback; after each 200, probe every gateway concurrently
    until each serves the new version. Results go to `run` (and a row per change)."""
    current = served_version(control.expect("GET", "/endpoint", None, (200,))["rule"])
    widths = [6, 8, 2, 6, 8, *[7] * len(probers), 6, 6]
    headers = ["change", "action", "to", "api ms", "every ms",
               *[f"gw{i + 1} ms" for i in range(len(probers))], "probes", "errors"]  # fmt: skip
    print(format_table(headers, [], min_widths=widths, left_columns=2), flush=True)
    stop = threading.Event()
    pool = concurrent.futures.ThreadPoolExecutor(len(probers), thread_name_prefix="probe")
    try:
        for index in range(settings.changes):
            action = "switch" if index % 2 == 0 else "rollback"
            expected = next(v for v in CONVERGENCE_VERSIONS if v != current)
            sent = time.perf_counter()
            status, body = control.call("POST", f"/endpoint:{action}")
            acked = time.perf_counter()
            if status != 200 or not isinstance(body, dict):
                raise HarnessError(f"{action} answered {status}: {body}")
            version = served_version(body["rule"])
            if version != expected:
                run.warnings.append(
                    f"change {index + 1} ({action}) routed to version {version}, expected "
                    f"{expected}"
                )
            futures = [
                pool.submit(p.probe_until, version, acked + settings.timeout_s, stop,
                            settings.probe_pause_s)
                for p in probers
            ]  # fmt: skip
            outcomes = [f.result() for f in futures]
            result = ChangeResult(
                index=index,
                action=action,
                version=version,
                revision=int(body.get("revision", -1)),
                api_ms=(acked - sent) * 1000.0,
                gateway_ms=[
                    (o.arrived - acked) * 1000.0 if o.arrived is not None else math.inf
                    for o in outcomes
                ],
                probes=[o.probes for o in outcomes],
                errors=[o.errors for o in outcomes],
            )
            for prober, outcome in zip(probers, outcomes, strict=True):
                if outcome.arrived is None:
                    run.warnings.append(
                        f"change {index + 1}: {prober.name} did not serve version {version} "
                        f"within {settings.timeout_s:.0f}s (last error: "
                        f"{outcome.last_error or 'none'})"
                    )
            run.changes.append(result)
            print(format_row(change_row(result), widths, left_columns=2), flush=True)
            current = version
            time.sleep(settings.pause_s)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def change_row(c: ChangeResult) -> list[str]:
    return [
        str(c.index + 1),
        c.action,
        c.version,
        fmt_number(c.api_ms, 1),
        fmt_number(c.every_ms, 1),
        *[fmt_number(ms, 1) for ms in c.gateway_ms],
        str(sum(c.probes)),
        str(sum(c.errors)),
    ]


def run_feed_mode(mode: str, settings: ConvergenceSettings, workdir: Path) -> FeedRun:
    """Controller (local runtime, versions 1 and 2 running, 100% to 1) and gateways
    following it through `mode`; then the changes. Every process is stopped on return."""
    run = FeedRun(mode, settings.gateways)
    moddir = workdir / mode
    moddir.mkdir()
    control: ControllerClient | None = None
    probers: list[GatewayProber] = []
    with managed_processes() as procs, controller_replicas_stopped(procs) as replicas:
        try:
            ports = free_ports(2 + 2 * settings.gateways)
            controller_port, redis_port = ports[:2]
            store_args: list[str] = []
            feed_args = ["--controller", f"http://{LOOPBACK}:{controller_port}"]
            if mode == FEED_REDIS:
                redis_path = ensure_tools(["redis-server"])["redis-server"]
                redis = procs.start("redis", redis_argv(redis_path, redis_port), cpus=None,
                                    log_path=moddir / "redis.log")  # fmt: skip
                wait_for_port(LOOPBACK, redis_port, proc=redis)
                redis_url = f"redis://{LOOPBACK}:{redis_port}/0"
                store_args = ["--store", redis_url]
                feed_args = ["--redis", redis_url]
            controller = procs.start(
                "controller", controller_argv(controller_port, moddir / "state", store_args),
                cpus=None, log_path=moddir / "controller.log",
            )  # fmt: skip
            wait_for_http_ok(LOOPBACK, controller_port, "/healthz", proc=controller)
            control = ControllerClient(controller_port, CONVERGENCE_PROJECT, CONVERGENCE_MODEL)
            try:
                deploy_and_wait(control, CONVERGENCE_VERSIONS, controller=controller)
            finally:
                replicas += descendants(controller.pid)
            first = weighted_rule({CONVERGENCE_VERSIONS[0]: 100})
            control.expect("PUT", "/endpoint", {"rule": first}, (200, 201))
            gateways: list[tuple[ChildProcess, int, int]] = []
            for i in range(settings.gateways):
                port, admin = ports[2 + 2 * i : 4 + 2 * i]
                # One worker each: every gateway process is one follower of the feed.
                extra = ["--workers", "1", *settings.gateway_args]
                argv = gateway_argv(feed_args, port, admin, extra)
                proc = procs.start(f"gateway{i + 1}", argv, cpus=None,
                                   log_path=moddir / f"gateway{i + 1}.log")  # fmt: skip
                gateways.append((proc, port, admin))
            for proc, port, admin in gateways:
                wait_for_port(LOOPBACK, port, proc=proc)
                wait_for_http_ok(LOOPBACK, admin, "/readyz", proc=proc)
                prober = GatewayProber(proc.name, port, admin)
                probers.append(prober)
                wait_until_serving(prober, CONVERGENCE_VERSIONS[0])
                # Warm both versions' upstream connections through the version hosts.
                for version in CONVERGENCE_VERSIONS:
                    host = f"{CONVERGENCE_MODEL}-{version}.{CONVERGENCE_PROJECT}.localhost"
                    status, served = prober.predict(host)
                    if status != 200 or served != version:
                        raise HarnessError(f"{proc.name}: {host} answered {status} from {served}")
            measure_changes(control, probers, settings, run)
            for proc, _, _ in gateways:
                proc.check_alive(proc.name)
            run.warnings += revision_warnings(controller_port, probers)
            for prober in probers:
                if prober.reconnects:
                    run.warnings.append(
                        f"{prober.name} closed {prober.reconnects} kept-alive probe "
                        "connection(s); probes reconnected"
                    )
        finally:
            for prober in probers:
                prober.close()
            if control is not None:
                control.close()
    return run


def revision_warnings(controller_port: int, probers: Sequence[GatewayProber]) -> list[str]:
    """Gateways not on the controller's latest revision once the changes are done (after
    a moment for anything still in flight)."""
    time.sleep(0.2)
    want = controller_revision(controller_port)
    warnings = []
    for prober in probers:
        have = gateway_revision(prober.admin_port)
        if want is not None and have != want:
            warnings.append(
                f"{prober.name} serves route-table revision {have}, controller is at {want}"
            )
    return warnings


def run_convergence(args: argparse.Namespace) -> int:
    """Time from an accepted change until every gateway serves it, per feed mode."""
    modes = list(FEED_MODES) if args.feed == "both" else [args.feed]
    if not CUSTOM_MODEL.is_file():
        raise HarnessError(f"{CUSTOM_MODEL} not found")
    settings = ConvergenceSettings(
        changes=args.changes,
        gateways=args.gateways,
        pause_s=args.pause_ms / 1000.0,
        probe_pause_s=args.probe_pause_ms / 1000.0,
        timeout_s=args.change_timeout,
        gateway_args=args.gateway_arg,
    )
    print(
        f"bench convergence: feed {' and '.join(modes)}; {args.gateways} gateway processes "
        f"(one worker each) following a controller (local runtime, {CONVERGENCE_PROJECT}/"
        f"{CONVERGENCE_MODEL} versions {' and '.join(CONVERGENCE_VERSIONS)}); {args.changes} "
        f"changes alternating switch and rollback, {args.pause_ms} ms apart; after each 200, "
        f"every gateway probed with predict requests back to back until it serves the new "
        f"version (unpinned)",
        flush=True,
    )
    busy = busy_machine_warning()
    runs: list[FeedRun] = []
    with tempfile.TemporaryDirectory(prefix="merlin-bench-convergence-") as tmp:
        for mode in modes:
            print(f"\nfeed {mode}:", flush=True)
            runs.append(run_feed_mode(mode, settings, Path(tmp)))
    report_convergence(runs, [busy] if busy else [])
    return 0


def busy_machine_warning() -> str | None:
    """A warning when something else keeps the machine busy before the run starts."""
    busy = busy_machine()
    if busy is None:
        return None
    load, cpus = busy
    return (
        f"load average {load:.2f} on {cpus} CPUs before the run: other work competes "
        "with the gateways and the controller; run it once more on a quiet machine"
    )


_CONVERGENCE_HEADERS = ("", "changes", "p50 ms", "p95 ms", "p99 ms", "max ms", "mean ms",
                        "probes", "errors")  # fmt: skip


def convergence_row(name: str, values: Sequence[float], probes: int, errors: int) -> list[str]:
    ordered = sorted(values)
    mean = statistics.fmean(ordered) if ordered else float("nan")
    return [
        name,
        str(len(ordered)),
        *[fmt_number(percentile(ordered, pct), 1) for pct in (50, 95, 99)],
        fmt_number(ordered[-1] if ordered else float("nan"), 1),
        fmt_number(mean, 1),
        str(probes),
        str(errors),
    ]


def report_feed_run(run: FeedRun) -> None:
    """The table of one feed mode: every gateway, the same from the call's send, each
    gateway, all gateways pooled."""
    changes = run.changes
    rows = [
        convergence_row("every gateway", [c.every_ms for c in changes],
                        sum(sum(c.probes) for c in changes), sum(sum(c.errors) for c in changes)),
        convergence_row("every gateway, from send", [c.every_ms + c.api_ms for c in changes],
                        sum(sum(c.probes) for c in changes), sum(sum(c.errors) for c in changes)),
        [*convergence_row("API call", [c.api_ms for c in changes], 0, 0)[:-2], "", ""],
    ]  # fmt: skip
    for i in range(run.gateways):
        rows.append(convergence_row(
            f"gateway {i + 1}", [c.gateway_ms[i] for c in changes],
            sum(c.probes[i] for c in changes), sum(c.errors[i] for c in changes),
        ))  # fmt: skip
    rows.append(convergence_row(
        "per gateway (pooled)", [ms for c in changes for ms in c.gateway_ms],
        sum(sum(c.probes) for c in changes), sum(sum(c.errors) for c in changes),
    ))  # fmt: skip
    print()
    print(
        f"feed {run.mode}: {len(changes)} changes, {run.gateways} gateways; ms from the "
        "change's 200 (\"from send\": from sending it) until a gateway's first answer from "
        "the new version"
    )
    print(format_table(_CONVERGENCE_HEADERS, rows))
    pairs = [(n, e) for c in changes for n, e in zip(c.probes, c.errors, strict=True)]
    first = sum(1 for n, e in pairs if n == 1 and e == 0)
    print(
        f"the first probe after the 200 already got the new version in {first} of "
        f"{len(pairs)} gateway-changes (those times are one probe's round trip, this "
        "measurement's resolution)"
    )


def convergence_warnings(run: FeedRun) -> list[str]:
    """Probe errors, changes not served everywhere, a p99 resting on one outlier."""
    warnings = [f"feed {run.mode}: {w}" for w in run.warnings]
    errors = sum(sum(c.errors) for c in run.changes)
    if errors:
        warnings.append(
            f"feed {run.mode}: {errors} probe(s) failed (non-200 or a failed exchange) though "
            "both versions stay running"
        )
    every = run.every_ms()
    if every and len(every) < P99_IS_MAX_BELOW:
        mid = percentile(every, 50)
        if mid > 0 and every[-1] > OUTLIER_FACTOR * mid and math.isfinite(every[-1]):
            warnings.append(
                f"feed {run.mode}: with {len(every)} changes the p99 is the slowest one, "
                f"{every[-1]:.1f} ms, {every[-1] / mid:.0f}x the median; run it once more or "
                f"with --changes {P99_IS_MAX_BELOW} or more"
            )
    return warnings


def report_convergence(runs: Sequence[FeedRun], warnings: Sequence[str]) -> None:
    """A table per feed mode, the goal, the noise guard and the RESULT line."""
    for run in runs:
        report_feed_run(run)
    p99 = {run.mode: run.p99_ms() for run in runs}
    worst = max(p99.values()) if p99 else float("nan")
    gateways = runs[0].gateways if runs else 0
    print()
    goal = ", ".join(
        f"{mode} {value:.1f} ms {goal_mark(value < CONVERGENCE_GOAL_P99_MS)}"
        for mode, value in p99.items()
    )
    print(
        f"goal (reported, not asserted): p99 under {CONVERGENCE_GOAL_P99_MS:.0f} ms with "
        f"{CONVERGENCE_GOAL_GATEWAYS} gateways; {gateways} gateways: {goal}"
    )
    all_warnings = [*warnings, *(w for run in runs for w in convergence_warnings(run))]
    for warning in all_warnings:
        print(f"inconclusive: {warning}")
    fields = " ".join(f"{mode}_p99_ms={value:.1f}" for mode, value in p99.items())
    print(f"RESULT convergence gateways={gateways} p99_ms={worst:.1f} {fields}")


# --- command line ---------------------------------------------------------------------


def _probe_pause_ms(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] ms, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "convergence",
        help="time from an accepted change until every gateway serves it",
        description=(
            "Start a controller (local runtime) running versions 1 and 2 of fraud/scorer "
            "with 100% to version 1, and gateway processes following it; then alternate "
            "endpoint:switch and endpoint:rollback, and after each 200 probe every gateway "
            "with predict requests until X-Model-Version names the new version. Feeds: the "
            "controller's route-table stream, and Redis (controller --store, gateways "
            "--redis). Ends with: RESULT convergence gateways=<n> p99_ms=<worst p99> "
            "controller_p99_ms=<ms> redis_p99_ms=<ms>"
        ),
    )
    parser.add_argument(
        "--feed",
        choices=[*FEED_MODES, "both"],
        default="both",
        help="how gateways follow the controller (default: %(default)s)",
    )
    parser.add_argument(
        "--changes",
        type=positive_int,
        default=DEFAULT_CHANGES,
        help="changes per feed mode (default: %(default)s)",
    )
    parser.add_argument(
        "--gateways",
        type=positive_int,
        default=DEFAULT_GATEWAYS,
        help="gateway processes, one worker each (default: %(default)s)",
    )
    parser.add_argument(
        "--pause-ms",
        type=non_negative_int,
        default=DEFAULT_CHANGE_PAUSE_MS,
        help="idle time after a change reached every gateway (default: %(default)s)",
    )
    parser.add_argument(
        "--probe-pause-ms",
        type=_probe_pause_ms,
        default=0.0,
        help="sleep between a gateway's probes, at most 1 ms (default: %(default)s: back to back)",
    )
    parser.add_argument(
        "--change-timeout",
        type=_positive_float,
        default=DEFAULT_CHANGE_TIMEOUT_S,
        help="seconds a gateway gets to serve a change before it counts as "
        "never (inf) (default: %(default)s)",
    )
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra gateway argument, repeatable; write options as "
        "--gateway-arg=--max-body-bytes=1000",
    )
    parser.set_defaults(run=run_convergence)
