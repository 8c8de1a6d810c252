"""Benchmark harness for the gateway: ``python -m loadtests.bench <benchmark>``.

This module owns the benchmarks that compare the gateway with a native reference on this
machine, following the layout in ``shared/BENCHMARKING.md``: the upstream and the load
generator pinned to one CPU, the system under test (the reference or the gateway, one
worker) pinned to the other, interleaved rounds, per-round ratios and their medians, CPU
time per request of the system under test read from ``/proc/<pid>/stat``, and a noise
guard that calls a run inconclusive (a warning, never a failure).

Benchmarks are argparse subcommands. Today there is ``http``: nginx ``proxy_pass`` against
the gateway's weighted model endpoint and its pass-through version endpoint. Later ones
(``shadow``, ``grpc``, ``autoscale``) are meant to reuse the helpers below:

- tools: :func:`find_tool`, :func:`ensure_tools` (installs Debian packages when missing);
- processes: :func:`start_pinned`, :func:`stop_pinned`, :func:`managed_processes`;
- ports: :func:`free_port`, :func:`free_ports`, :func:`wait_for_port`, :func:`wait_for_http_ok`;
- load: :class:`WrkRequest`, :func:`run_wrk`, :func:`parse_wrk_output`,
  :func:`parse_wrk_time_ms`;
- measuring: :func:`read_cpu_seconds`, :func:`process_tree_cpu_seconds`,
  :func:`measure_target`, :func:`median`, :func:`relative_spread`;
- systems: :func:`nginx_upstream_conf`, :func:`nginx_proxy_conf`, :func:`start_nginx`,
  :func:`build_routes`, :func:`weighted_rule`, :func:`write_route_file`,
  :func:`start_gateway`.

It is a benchmark, not a test: it reports numbers and asserts nothing about them. All
traffic goes to 127.0.0.1, every run is bounded in time, and every process it starts is
stopped in a ``finally`` (Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

LOOPBACK = "127.0.0.1"
# What the upstream answers to every request, and what the load generator sends.
UPSTREAM_BODY = '{"predictions":[1,0,2]}'
PREDICT_BODY = '{"instances":[[1,2,3]]}'
SATURATING_CONNECTIONS = 64
# Debian package that provides each tool the benchmarks run.
APT_PACKAGES: dict[str, str] = {"nginx": "nginx-light", "wrk": "wrk", "h2load": "nghttp2-client"}
# Where a tool may live outside a non-root PATH (nginx is in /usr/sbin).
_EXTRA_TOOL_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Default CPU layout: the system under test alone on CPU 1, upstream and wrk on CPU 0.
DEFAULT_SUT_CPUS = "1"
DEFAULT_LOAD_CPUS = "0"
# Noise guard thresholds (BENCHMARKING.md): spread = (max - min) / median across rounds.
NGINX_SPREAD_LIMIT = 0.10
RATIO_SPREAD_LIMIT = 0.35
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0


class BenchError(RuntimeError):
    """The benchmark could not run (a tool missing, a process that didn't start, ...)."""


# --- tools ----------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """The path of executable `name` on PATH or in the sbin directories, or None."""
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in _EXTRA_TOOL_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def install_apt_packages(packages: Sequence[str]) -> None:
    """`apt-get install -y PACKAGES`, running `apt-get update` first if that fails."""
    if os.geteuid() != 0:
        raise BenchError(f"need root to install {' '.join(packages)}; install them and rerun")
    if shutil.which("apt-get") is None:
        raise BenchError(f"apt-get not found; install {' '.join(packages)} and rerun")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    print(f"bench: installing {' '.join(packages)}", file=sys.stderr, flush=True)
    if subprocess.run(install, env=env, check=False, timeout=900).returncode == 0:
        return
    subprocess.run(["apt-get", "update"], env=env, check=False, timeout=900)
    if subprocess.run(install, env=env, check=False, timeout=900).returncode != 0:
        raise BenchError(f"apt-get install {' '.join(packages)} failed")


def ensure_tools(names: Sequence[str]) -> dict[str, str]:
    """Find each tool in `names` (keys of APT_PACKAGES), installing missing ones."""
    paths = {name: find_tool(name) for name in names}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        install_apt_packages(sorted({APT_PACKAGES[name] for name in missing}))
        paths = {name: find_tool(name) for name in names}
    found: dict[str, str] = {}
    for name, path in paths.items():
        if path is None:
            raise BenchError(f"{name} is still missing after installing {APT_PACKAGES[name]}")
        found[name] = path
    return found


# --- processes ------------------------------------------------------------------------


@dataclass
class PinnedProcess:
    """A process started in its own session, optionally pinned to CPUs with taskset."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    cpus: str | None

    @property
    def pid(self) -> int:
        # taskset execs the command, so this is the pid of the command itself.
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def describe_failure(self) -> str:
        status = self.popen.poll()
        state = f"exited with {status}" if status is not None else "still running"
        tail = self.log_tail()
        if not tail:
            return f"{self.name} ({state}); empty log {self.log_path}"
        return f"{self.name} ({state}); log {self.log_path}:\n{tail}"


def pin_argv(argv: Sequence[str], cpus: str | None) -> list[str]:
    """`argv` prefixed with `taskset -c CPUS` (unchanged when cpus is None)."""
    return ["taskset", "-c", cpus, *argv] if cpus is not None else list(argv)


def start_pinned(
    name: str,
    argv: Sequence[str],
    *,
    cpus: str | None,
    log_path: Path,
    env: Mapping[str, str] | None = None,
) -> PinnedProcess:
    """Start `argv` pinned to `cpus` in a new session, stdout and stderr to `log_path`."""
    full_argv = pin_argv(argv, cpus)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            full_argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
    return PinnedProcess(name, full_argv, popen, log_path, cpus)


def stop_pinned(proc: PinnedProcess, *, grace_seconds: float = STOP_GRACE_S) -> None:
    """SIGTERM the process's group, SIGKILL it after `grace_seconds`; reap the process."""
    pgid = proc.pid  # start_new_session: the process leads its own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.popen.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        print(f"bench: {proc.name} ignored SIGTERM, killing it", file=sys.stderr)
    # Kill anything left in the group (workers of a supervisor, a stuck process).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(timeout=5.0)


@dataclass
class ProcessSet:
    """The processes a benchmark started; see :func:`managed_processes`."""

    processes: list[PinnedProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> PinnedProcess:
        proc = start_pinned(name, argv, cpus=cpus, log_path=log_path, env=env)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process, newest first; SIGKILL the rest if interrupted meanwhile."""
        try:
            while self.processes:
                stop_pinned(self.processes[-1])
                self.processes.pop()
        except BaseException:
            for proc in self.processes:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            self.processes.clear()
            raise


@contextlib.contextmanager
def managed_processes() -> Iterator[ProcessSet]:
    """A ProcessSet whose processes are all stopped, newest first, however the block ends."""
    procs = ProcessSet()
    try:
        yield procs
    finally:
        procs.stop_all()


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- ports and readiness --------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free TCP ports on `host` (all held open while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _check_alive(proc: PinnedProcess | None, what: str) -> None:
    if proc is not None and proc.exited():
        raise BenchError(f"{what}: {proc.describe_failure()}")


def wait_for_port(
    host: str, port: int, *, timeout: float = STARTUP_TIMEOUT_S, proc: PinnedProcess | None = None
) -> None:
    """Wait until `host:port` accepts a TCP connection (fail early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(proc, f"waiting for {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                detail = f": {proc.describe_failure()}" if proc is not None else ""
                raise BenchError(
                    f"{host}:{port} not accepting after {timeout:.0f}s ({exc}){detail}"
                ) from exc
            time.sleep(0.05)


def http_get(
    host: str, port: int, path: str, *, host_header: str | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """One plain-HTTP GET; returns (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Host": host_header} if host_header is not None else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_for_http_ok(
    host: str,
    port: int,
    path: str,
    *,
    timeout: float = STARTUP_TIMEOUT_S,
    proc: PinnedProcess | None = None,
) -> None:
    """Wait until GET `path` on `host:port` answers 200 (fail early if `proc` exits)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        _check_alive(proc, f"waiting for http://{host}:{port}{path}")
        try:
            status, _ = http_get(host, port, path, timeout=2.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise BenchError(f"http://{host}:{port}{path} not ready after {timeout:.0f}s ({last})")
        time.sleep(0.1)


# --- statistics and CPU time ----------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of `values` (NaN when there are none)."""
    return statistics.median(values) if values else float("nan")


def relative_spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much per-round figures vary (0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else float("inf")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name; index 0 is field 3 (state)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def read_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` in seconds, from /proc/<pid>/stat."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` plus its live descendants (a supervisor's workers, say)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])  # field 4: ppid
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            total += read_cpu_seconds(current)
        except (OSError, ValueError, IndexError):
            if current == pid:
                raise
            continue
        stack.extend(children.get(current, []))
    return total


# --- wrk ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRequest:
    """What wrk sends: method, path, Host header, body."""

    path: str = "/v1/predict"
    host_header: str | None = None
    method: str = "POST"
    body: str = PREDICT_BODY
    content_type: str = "application/json"

    def lua_script(self) -> str:
        """A wrk script setting method, body and content type (Host goes in -H)."""
        level = "=" * 3
        while f"]{level}]" in self.body:
            level += "="
        lines = [f'wrk.method = "{self.method}"']
        if self.body:
            lines.append(f"wrk.body = [{level}[{self.body}]{level}]")
            lines.append(f'wrk.headers["Content-Type"] = "{self.content_type}"')
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run reported. Latencies are in milliseconds, keyed by percentile."""

    requests: int
    duration_s: float
    requests_per_s: float
    latency_ms: dict[float, float]
    non_2xx: int
    socket_errors: int
    raw: str

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def percentile_ms(self, pct: float) -> float:
        return self.latency_ms.get(pct, float("nan"))


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m|h)\s*$")
_PERCENTILE_RE = re.compile(r"^\s*([0-9.]+)%\s+([0-9.]+\s*(?:us|ms|s|m|h))\s*$")
_SUMMARY_RE = re.compile(r"^\s*(\d+) requests in ([0-9.]+\s*(?:us|ms|s|m|h)),")
_RPS_RE = re.compile(r"^Requests/sec:\s*([0-9.]+)")
_NON_2XX_RE = re.compile(r"^\s*Non-2xx or 3xx responses:\s*(\d+)")
_SOCKET_ERRORS_RE = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def parse_wrk_time_ms(text: str) -> float:
    """A wrk time such as `812.00us`, `1.25ms`, `2.00s` or `1.00m`, in milliseconds."""
    match = _TIME_RE.match(text)
    if match is None:
        raise ValueError(f"not a wrk time: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk_output(text: str) -> WrkResult:
    """Parse wrk's report: request count, duration, req/s, latency distribution, errors."""
    requests: int | None = None
    duration_s = float("nan")
    rps: float | None = None
    latency: dict[float, float] = {}
    non_2xx = 0
    socket_errors = 0
    for line in text.splitlines():
        if m := _PERCENTILE_RE.match(line):
            latency[float(m.group(1))] = parse_wrk_time_ms(m.group(2))
        elif m := _SUMMARY_RE.match(line):
            requests = int(m.group(1))
            duration_s = parse_wrk_time_ms(m.group(2)) / 1000.0
        elif m := _RPS_RE.match(line):
            rps = float(m.group(1))
        elif m := _NON_2XX_RE.match(line):
            non_2xx = int(m.group(1))
        elif m := _SOCKET_ERRORS_RE.match(line):
            socket_errors = sum(int(g) for g in m.groups())
    if requests is None or rps is None:
        raise BenchError(f"could not parse wrk output:\n{text}")
    return WrkResult(requests, duration_s, rps, latency, non_2xx, socket_errors, text)


def run_wrk(
    wrk_path: str,
    url: str,
    request: WrkRequest,
    *,
    seconds: int,
    connections: int,
    threads: int = 1,
    latency: bool = False,
    cpus: str | None = None,
    script_dir: Path,
) -> WrkResult:
    """Run `wrk -tT -cC -dS` against `url` (pinned to `cpus`) and parse its report."""
    script = script_dir / "wrk-request.lua"
    script.write_text(request.lua_script())
    argv = [wrk_path, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(script)]
    if request.host_header is not None:
        argv += ["-H", f"Host: {request.host_header}"]
    if latency:
        argv.append("--latency")
    argv.append(url)
    done = subprocess.run(
        pin_argv(argv, cpus),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_wrk_output(done.stdout)


# --- measuring a target ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A system under test as the load generator sees it."""

    name: str
    url: str
    request: WrkRequest
    process: PinnedProcess


@dataclass(frozen=True)
class RoundMeasurement:
    """One target in one round: the saturating run, its CPU cost, and the c=1 run."""

    target: str
    round_index: int
    load: WrkResult
    cpu_us_per_request: float
    c1: WrkResult


@dataclass(frozen=True)
class LoadSettings:
    """How long and how hard each target is driven in a round."""

    seconds: int
    warmup_seconds: int
    c1_seconds: int
    connections: int
    load_cpus: str | None
    wrk_path: str
    script_dir: Path


def check_target(target: Target, expected_body: str) -> None:
    """One request the way wrk will send it; the answer must be 200 with `expected_body`."""
    host, _, rest = target.url.removeprefix("http://").partition(":")
    port = int(rest.split("/", 1)[0])
    req = target.request
    conn = http.client.HTTPConnection(host, port, timeout=5.0)
    try:
        headers = {"Content-Type": req.content_type}
        if req.host_header is not None:
            headers["Host"] = req.host_header
        conn.request(req.method, req.path, body=req.body.encode(), headers=headers)
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    except OSError as exc:
        raise BenchError(f"{target.name}: request failed: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200 or body.strip() != expected_body:
        raise BenchError(
            f"{target.name}: expected 200 {expected_body}, got {response.status} {body[:200]!r}"
        )


def measure_target(target: Target, round_index: int, settings: LoadSettings) -> RoundMeasurement:
    """Warm up, run the saturating load reading the target's CPU time around it, run c=1."""
    url = target.url + target.request.path
    common: dict[str, Any] = {
        "cpus": settings.load_cpus,
        "script_dir": settings.script_dir,
    }
    if settings.warmup_seconds > 0:
        run_wrk(
            settings.wrk_path, url, target.request,
            seconds=settings.warmup_seconds, connections=settings.connections, **common,
        )  # fmt: skip
    _check_alive(target.process, target.name)
    cpu_before = process_tree_cpu_seconds(target.process.pid)
    load = run_wrk(
        settings.wrk_path, url, target.request,
        seconds=settings.seconds, connections=settings.connections, **common,
    )  # fmt: skip
    cpu_after = process_tree_cpu_seconds(target.process.pid)
    c1 = run_wrk(
        settings.wrk_path, url, target.request,
        seconds=settings.c1_seconds, connections=1, latency=True, **common,
    )  # fmt: skip
    _check_alive(target.process, target.name)
    cpu_us = (cpu_after - cpu_before) * 1e6 / load.requests if load.requests else float("nan")
    return RoundMeasurement(target.name, round_index, load, cpu_us, c1)


# --- nginx ----------------------------------------------------------------------------


def _nginx_main_conf(prefix: Path, events_and_http: str) -> str:
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{events_and_http}"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""\
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;"""


def nginx_upstream_conf(prefix: Path, port: int, body: str = UPSTREAM_BODY) -> str:
    """nginx (one process) answering every request with 200 and the fixed JSON `body`."""
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    return _nginx_main_conf(prefix, f"""\
events {{ worker_connections 4096; }}
http {{
{_nginx_http_common(prefix)}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        default_type application/json;
        location / {{ return 200 '{escaped}'; }}
    }}
}}
""")  # fmt: skip


def nginx_proxy_conf(prefix: Path, port: int, upstream: str) -> str:
    """nginx (one process) proxying everything to `upstream` over kept-alive HTTP/1.1."""
    return _nginx_main_conf(prefix, f"""\
events {{ worker_connections 4096; }}
http {{
{_nginx_http_common(prefix)}
    upstream bench_upstream {{
        server {upstream};
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")  # fmt: skip


def start_nginx(
    procs: ProcessSet,
    name: str,
    conf_text: Callable[[Path], str],
    *,
    nginx_path: str,
    port: int,
    workdir: Path,
    cpus: str | None,
) -> PinnedProcess:
    """Start one nginx process from `conf_text(prefix)` in `workdir/name`; wait for `port`."""
    prefix = workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text(prefix))
    argv = [nginx_path, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    proc = procs.start(name, argv, cpus=cpus, log_path=prefix / "stdout.log")
    wait_for_port(LOOPBACK, port, proc=proc)
    return proc


# --- gateway --------------------------------------------------------------------------

BENCH_PROJECT = "bench"
BENCH_MODEL = "m"
DEFAULT_WEIGHTS: dict[str, int] = {"1": 90, "2": 10}


def weighted_rule(weights: Mapping[str, int]) -> dict[str, Any]:
    """A model-endpoint rule splitting traffic across versions by weight."""
    return {"destinations": [{"version": v, "weight": w} for v, w in weights.items()]}


def build_routes(
    replica: str,
    *,
    project: str = BENCH_PROJECT,
    model: str = BENCH_MODEL,
    versions: Sequence[str] = tuple(DEFAULT_WEIGHTS),
    model_rule: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A route table: each version served by `replica`, one model endpoint with `model_rule`
    (the 90/10 weighted rule by default; pass one with header matches to bench those)."""
    rule = dict(model_rule) if model_rule is not None else weighted_rule(DEFAULT_WEIGHTS)
    return {
        "version_endpoints": [
            {"project": project, "model": model, "version": v, "replicas": [replica]}
            for v in versions
        ],
        "model_endpoints": [{"project": project, "model": model, "rule": rule}],
    }


def write_route_file(routes: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(routes), sort_keys=False))
    return path


def gateway_argv(
    routes_file: Path, port: int, admin_port: int, extra_args: Sequence[str] = ()
) -> list[str]:
    """`merlin-dp gateway` with this interpreter (no shim in between: the pid is the server)."""
    return [
        sys.executable, "-m", "controller.cli", "gateway",
        "--routes", str(routes_file),
        "--listen", f"{LOOPBACK}:{port}",
        "--admin", f"{LOOPBACK}:{admin_port}",
        "--log-level", "WARNING",
        *extra_args,
    ]  # fmt: skip


def start_gateway(
    procs: ProcessSet,
    routes_file: Path,
    *,
    port: int,
    admin_port: int,
    workdir: Path,
    cpus: str | None,
    extra_args: Sequence[str] = (),
) -> PinnedProcess:
    """Start the gateway and wait until its port accepts and /readyz answers 200."""
    argv = gateway_argv(routes_file, port, admin_port, extra_args)
    proc = procs.start("gateway", argv, cpus=cpus, log_path=workdir / "gateway.log")
    wait_for_port(LOOPBACK, port, proc=proc)
    wait_for_http_ok(LOOPBACK, admin_port, "/readyz", proc=proc)
    return proc


# --- reporting ------------------------------------------------------------------------


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value != value else f"{value:,.{digits}f}"  # NaN check


def format_row(cells: Sequence[str], widths: Sequence[int], left_columns: int = 1) -> str:
    """One table line: the first `left_columns` cells left-aligned, the rest right-aligned."""
    out = [
        c.ljust(w) if i < left_columns else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(out).rstrip()


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    min_widths: Sequence[int] = (),
    left_columns: int = 1,
) -> str:
    """A plain-text table with a header rule; columns as wide as their widest cell."""
    widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
    widths = [max(w, m) for w, m in zip(widths, [*min_widths, *[0] * len(widths)], strict=False)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(format_row(cells, widths, left_columns) for cells in lines)


_ROUND_HEADERS = ["round", "target", "req/s", "CPU µs/req", "c1 p50 ms", "c1 p99 ms", "errors"]
_ROUND_WIDTHS = [5, 11, 8, 10, 9, 9, 6]


def round_row(m: RoundMeasurement) -> list[str]:
    return [
        str(m.round_index + 1),
        m.target,
        _fmt(m.load.requests_per_s, 0),
        _fmt(m.cpu_us_per_request, 1),
        _fmt(m.c1.percentile_ms(50), 3),
        _fmt(m.c1.percentile_ms(99), 3),
        str(m.load.errors + m.c1.errors),
    ]


# --- the http benchmark ---------------------------------------------------------------

HTTP_REFERENCE = "nginx"
HTTP_GATEWAY = "gateway"
HTTP_PASSTHROUGH = "passthrough"


def _usable_cpus(sut_cpus: str, load_cpus: str) -> tuple[str | None, str | None]:
    """The CPU lists to pin to, or (None, None) with a warning when they aren't all here."""
    available = os.sched_getaffinity(0)
    wanted: set[int] = set()
    for spec in (sut_cpus, load_cpus):
        for part in spec.split(","):
            low, _, high = part.partition("-")
            wanted.update(range(int(low), int(high or low) + 1))
    if not wanted <= available:
        print(
            f"bench: warning: CPUs {sorted(wanted - available)} not available "
            f"(have {sorted(available)}); running unpinned, ratios will be noisier",
            file=sys.stderr,
        )
        return None, None
    return sut_cpus, load_cpus


def run_http(args: argparse.Namespace) -> int:
    """nginx proxy_pass vs the gateway (weighted model endpoint, pass-through version)."""
    tools = ensure_tools(["nginx", "wrk"])
    sut_cpus, load_cpus = _usable_cpus(args.sut_cpu, args.load_cpu)
    c1_seconds = args.c1_seconds if args.c1_seconds is not None else min(5, args.seconds)
    per_round = 3 * (args.warmup_seconds + args.seconds + c1_seconds)
    print(
        f"bench http: {args.rounds} rounds x 3 targets, {args.seconds}s at c={args.connections} "
        f"after {args.warmup_seconds}s warm-up, then {c1_seconds}s at c=1 "
        f"(about {args.rounds * per_round}s); system under test on CPU {sut_cpus}, "
        f"upstream and wrk on CPU {load_cpus}",
        flush=True,
    )
    measurements: list[RoundMeasurement] = []
    with (
        tempfile.TemporaryDirectory(prefix="merlin-bench-http-") as tmp,
        managed_processes() as procs,
    ):
        workdir = Path(tmp)
        upstream_port, proxy_port, gateway_port, admin_port = free_ports(4)
        upstream = f"{LOOPBACK}:{upstream_port}"
        start_nginx(
            procs, "upstream", lambda p: nginx_upstream_conf(p, upstream_port),
            nginx_path=tools["nginx"], port=upstream_port, workdir=workdir, cpus=load_cpus,
        )  # fmt: skip
        proxy = start_nginx(
            procs, "proxy", lambda p: nginx_proxy_conf(p, proxy_port, upstream),
            nginx_path=tools["nginx"], port=proxy_port, workdir=workdir, cpus=sut_cpus,
        )  # fmt: skip
        routes_file = write_route_file(build_routes(upstream), workdir / "routes.yaml")
        gateway = start_gateway(
            procs, routes_file, port=gateway_port, admin_port=admin_port,
            workdir=workdir, cpus=sut_cpus, extra_args=args.gateway_arg,
        )  # fmt: skip
        model_host = f"{BENCH_MODEL}.{BENCH_PROJECT}.localhost"
        version_host = f"{BENCH_MODEL}-1.{BENCH_PROJECT}.localhost"
        targets = [
            Target(HTTP_REFERENCE, f"http://{LOOPBACK}:{proxy_port}",
                   WrkRequest(host_header=model_host), proxy),
            Target(HTTP_GATEWAY, f"http://{LOOPBACK}:{gateway_port}",
                   WrkRequest(host_header=model_host), gateway),
            Target(HTTP_PASSTHROUGH, f"http://{LOOPBACK}:{gateway_port}",
                   WrkRequest(host_header=version_host), gateway),
        ]  # fmt: skip
        for target in targets:
            check_target(target, UPSTREAM_BODY)
        settings = LoadSettings(
            seconds=args.seconds,
            warmup_seconds=args.warmup_seconds,
            c1_seconds=c1_seconds,
            connections=args.connections,
            load_cpus=load_cpus,
            wrk_path=tools["wrk"],
            script_dir=workdir,
        )
        print(format_table(_ROUND_HEADERS, [], min_widths=_ROUND_WIDTHS, left_columns=2))
        for round_index in range(args.rounds):
            for target in targets:
                m = measure_target(target, round_index, settings)
                measurements.append(m)
                print(format_row(round_row(m), _ROUND_WIDTHS, left_columns=2), flush=True)
    report_http(measurements, [t.name for t in targets])
    return 0


def report_http(measurements: Sequence[RoundMeasurement], target_names: Sequence[str]) -> None:
    """Medians per target, medians of the per-round ratios, noise guard, the RESULT line."""
    by_round: dict[int, dict[str, RoundMeasurement]] = {}
    for m in measurements:
        by_round.setdefault(m.round_index, {})[m.target] = m
    rounds = [r for r in by_round.values() if all(name in r for name in target_names)]

    def ratios(name: str) -> list[float]:
        return [r[name].load.requests_per_s / r[HTTP_REFERENCE].load.requests_per_s for r in rounds]

    def c1_overheads(name: str) -> list[float]:
        return [
            r[name].c1.percentile_ms(50) - r[HTTP_REFERENCE].c1.percentile_ms(50) for r in rounds
        ]

    rows = []
    for name in target_names:
        ms = [r[name] for r in rounds]
        rows.append([
            name,
            _fmt(median([m.load.requests_per_s for m in ms]), 0),
            _fmt(median([m.cpu_us_per_request for m in ms]), 1),
            _fmt(median([m.c1.percentile_ms(50) for m in ms]), 3),
            _fmt(median([m.c1.percentile_ms(99) for m in ms]), 3),
            _fmt(median(ratios(name)), 3),
            _fmt(median(c1_overheads(name)), 3),
        ])  # fmt: skip
    print()
    print(f"medians over {len(rounds)} rounds (ratio and overhead: median of per-round values)")
    print(format_table(
        ["target", "req/s", "CPU µs/req", "c1 p50 ms", "c1 p99 ms", "÷ nginx", "c1 p50 +ms"],
        rows,
    ))  # fmt: skip

    gateway_ratio = median(ratios(HTTP_GATEWAY))
    passthrough_ratio = median(ratios(HTTP_PASSTHROUGH))
    overhead_ms = median(c1_overheads(HTTP_GATEWAY))
    print()
    print(
        f"gateway/nginx req/s = {gateway_ratio:.3f}, passthrough/nginx req/s = "
        f"{passthrough_ratio:.3f}, c1 p50 overhead = {overhead_ms:.3f} ms "
        f"(passthrough {median(c1_overheads(HTTP_PASSTHROUGH)):.3f} ms)"
    )

    for warning in http_noise_warnings(rounds, target_names):
        print(f"inconclusive: {warning}")
    print(f"RESULT http gateway/nginx={gateway_ratio:.3f} c1_p50_overhead_ms={overhead_ms:.3f}")


def http_noise_warnings(
    rounds: Sequence[Mapping[str, RoundMeasurement]], target_names: Sequence[str]
) -> list[str]:
    """BENCHMARKING.md's noise guard, plus any target that answered errors."""
    warnings = []
    nginx_rps = [r[HTTP_REFERENCE].load.requests_per_s for r in rounds]
    spread = relative_spread(nginx_rps)
    if spread > NGINX_SPREAD_LIMIT:
        warnings.append(
            f"nginx req/s varies {spread:.0%} across rounds (limit {NGINX_SPREAD_LIMIT:.0%}); "
            "run it once more"
        )
    ratios = [r[HTTP_GATEWAY].load.requests_per_s / r[HTTP_REFERENCE].load.requests_per_s
              for r in rounds]  # fmt: skip
    spread = relative_spread(ratios)
    if spread > RATIO_SPREAD_LIMIT:
        warnings.append(
            f"gateway/nginx ratio varies {spread:.0%} across rounds "
            f"(limit {RATIO_SPREAD_LIMIT:.0%}); run it once more"
        )
    for name in target_names:
        errors = sum(r[name].load.errors + r[name].c1.errors for r in rounds)
        if errors:
            warnings.append(f"{name} answered {errors} non-2xx responses or socket errors")
    return warnings


# --- command line ---------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_round_options(parser: argparse.ArgumentParser) -> None:
    """Options every interleaved-rounds benchmark takes."""
    parser.add_argument(
        "--rounds", type=_positive_int, default=5, help="interleaved rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds",
        type=_positive_int,
        default=10,
        help="seconds of each saturating run (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup-seconds",
        type=_non_negative_int,
        default=2,
        help="seconds of warm-up before each saturating run (default: %(default)s)",
    )
    parser.add_argument(
        "--c1-seconds",
        type=_positive_int,
        default=None,
        help="seconds of each c=1 latency run (default: min(5, --seconds))",
    )
    parser.add_argument(
        "--connections",
        type=_positive_int,
        default=SATURATING_CONNECTIONS,
        help="connections of the saturating run (default: %(default)s)",
    )
    parser.add_argument(
        "--sut-cpu",
        default=DEFAULT_SUT_CPUS,
        help="CPU list (taskset -c) of the system under test (default: %(default)s)",
    )
    parser.add_argument(
        "--load-cpu",
        default=DEFAULT_LOAD_CPUS,
        help="CPU list (taskset -c) of the load generator and upstream (default: %(default)s)",
    )
    parser.add_argument("--gateway-arg", action="append", default=[], metavar="ARG",
                        help="extra gateway argument, repeatable; write options as "
                             "--gateway-arg=--workers=2")  # fmt: skip


def add_http_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "http",
        help="nginx proxy_pass vs the gateway over HTTP/1.1",
        description=(
            "Compare nginx proxy_pass with the gateway (90/10 weighted model endpoint, and "
            "pass-through via the version endpoint host), all proxying to one nginx upstream. "
            "Ends with: RESULT http gateway/nginx=<ratio> c1_p50_overhead_ms=<ms>"
        ),
    )
    add_round_options(parser)
    parser.set_defaults(run=run_http)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="Benchmarks of the gateway against native references (see "
        "shared/BENCHMARKING.md for the layout).",
    )
    sub = parser.add_subparsers(title="benchmarks", metavar="<benchmark>", required=True)
    add_http_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result: int = args.run(args)
        return result
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; processes stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
