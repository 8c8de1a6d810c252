"""The load generators, wrk and h2load: running them (pinned to the load CPUs), parsing
their reports, and driving one target with them: a check request, a warm-up, and a
saturating run with the target's CPU time read around it.

wrk gives throughput and a latency distribution; h2load runs a fixed rate (``--rps``) or
HTTP/2 and gRPC load, and its ``--log-file`` gives every request's latency."""

from __future__ import annotations

import http.client
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from loadtests.harness.errors import HarnessError
from loadtests.harness.measure import percentile, process_tree_cpu_seconds
from loadtests.harness.processes import ChildProcess, pin_argv

# What the load generator sends by default.
PREDICT_BODY = '{"instances":[[1,2,3]]}'


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


_TIME_UNITS_MS: Mapping[str, float] = MappingProxyType(
    {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
)
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
        raise HarnessError(f"could not parse wrk output:\n{text}")
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
        raise HarnessError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return parse_wrk_output(done.stdout)


# --- h2load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class H2loadResult:
    """An h2load run: what it achieved and the latency of each 2xx request.

    `latencies_ms` comes from h2load's ``--log-file`` (h2load itself prints only
    min/max/mean/sd), sorted ascending, main-duration requests only (not the warm-up)."""

    requests_per_s: float
    succeeded: int
    failed: int
    errored: int
    timeouts: int
    non_2xx: int
    latencies_ms: list[float]
    raw: str

    @property
    def errors(self) -> int:
        return self.failed + self.errored + self.timeouts + self.non_2xx

    def percentile_ms(self, pct: float) -> float:
        return percentile(self.latencies_ms, pct)


_H2LOAD_FINISHED_RE = re.compile(r"^finished in [0-9.]+\s*\w+, ([0-9.]+) req/s")
_H2LOAD_REQUESTS_RE = re.compile(
    r"^requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_H2LOAD_STATUS_RE = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def parse_h2load_output(text: str, latencies_ms: list[float]) -> H2loadResult:
    """Parse h2load's summary (req/s, request counts, status classes)."""
    rps: float | None = None
    counts: tuple[int, ...] | None = None
    non_2xx = 0
    for line in text.splitlines():
        if m := _H2LOAD_FINISHED_RE.match(line):
            rps = float(m.group(1))
        elif m := _H2LOAD_REQUESTS_RE.match(line):
            counts = tuple(int(g) for g in m.groups())
        elif m := _H2LOAD_STATUS_RE.match(line):
            non_2xx = sum(int(g) for g in m.groups()[1:])
    if rps is None or counts is None:
        raise HarnessError(f"could not parse h2load output:\n{text}")
    succeeded, failed, errored, timeouts = counts
    return H2loadResult(rps, succeeded, failed, errored, timeouts, non_2xx, latencies_ms, text)


def read_h2load_log(path: Path) -> list[float]:
    """Latencies (ms, ascending) of the 2xx rows of an h2load ``--log-file``: tab-separated
    start time (µs since the epoch), status (-1 for a failed stream), µs to the response's
    end."""
    latencies: list[float] = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1].startswith("2"):
            latencies.append(int(fields[2]) / 1000.0)
    latencies.sort()
    return latencies


def run_h2load_fixed_rate(
    h2load_path: str,
    url: str,
    request: WrkRequest,
    *,
    rate: float,
    clients: int,
    seconds: int,
    warmup_seconds: int = 0,
    cpus: str | None = None,
    workdir: Path,
) -> H2loadResult:
    """`h2load --h1 -c CLIENTS --rps RATE/CLIENTS -D SECONDS` sending `request` to `url`.

    Each client keeps one HTTP/1.1 connection with one request in flight (a request body
    disables pipelining), so a client that falls behind queues its next request instead of
    adding a connection: compare the achieved rate with `rate`. Latency is per request
    from h2load's log file, so the percentiles cover every request of the main duration."""
    per_client = rate / clients
    if per_client < 1.0:
        raise HarnessError(f"fixed rate {rate:.1f} req/s is under 1 req/s for each of {clients}")
    body = workdir / "h2load-body"
    body.write_text(request.body)
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to an existing file
    argv = [
        h2load_path, "--h1", "-t1", f"-c{clients}", f"--rps={per_client:.3f}",
        f"-D{seconds}", f"--log-file={log}",
    ]  # fmt: skip
    if warmup_seconds > 0:
        argv.append(f"--warm-up-time={warmup_seconds}")
    if request.method == "POST":
        argv += ["-d", str(body), "-H", f"Content-Type: {request.content_type}"]
    elif request.method != "GET":
        raise HarnessError(f"h2load sends GET or POST, not {request.method}")
    if request.host_header is not None:
        argv += ["-H", f":authority: {request.host_header}"]  # h2load's name for Host
    argv.append(url)
    return run_h2load(argv, cpus, seconds + warmup_seconds + 30, log)


def run_h2load(
    argv: Sequence[str], cpus: str | None, timeout: float, log: Path | None
) -> H2loadResult:
    """Run h2load pinned to ``cpus``; its figures, with per-request latencies from
    ``log`` (its ``--log-file``) when given."""
    try:
        done = subprocess.run(
            pin_argv(argv, cpus),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"h2load did not finish within {timeout}s: {' '.join(argv)}") from exc
    if done.returncode != 0:
        raise HarnessError(
            f"h2load failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
        )
    latencies = read_h2load_log(log) if log is not None and log.exists() else []
    return parse_h2load_output(done.stdout, latencies)


# --- driving a target -----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A system under test as the load generator sees it."""

    name: str
    url: str
    request: WrkRequest
    process: ChildProcess


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
        raise HarnessError(f"{target.name}: request failed: {exc}") from exc
    finally:
        conn.close()
    if response.status != 200 or body.strip() != expected_body:
        raise HarnessError(
            f"{target.name}: expected 200 {expected_body}, got {response.status} {body[:200]!r}"
        )


def warm_up(target: Target, settings: LoadSettings) -> None:
    """`settings.warmup_seconds` of the saturating load, unmeasured (nothing when 0)."""
    if settings.warmup_seconds > 0:
        run_wrk(
            settings.wrk_path, target.url + target.request.path, target.request,
            seconds=settings.warmup_seconds, connections=settings.connections,
            cpus=settings.load_cpus, script_dir=settings.script_dir,
        )  # fmt: skip


def measure_saturating(target: Target, settings: LoadSettings) -> tuple[WrkResult, float]:
    """Warm up, then the saturating run; returns its result and the target's CPU µs/request
    (the CPU time of the target's process tree across the run over the requests served)."""
    url = target.url + target.request.path
    common: dict[str, Any] = {"cpus": settings.load_cpus, "script_dir": settings.script_dir}
    warm_up(target, settings)
    target.process.check_alive(target.name)
    cpu_before = process_tree_cpu_seconds(target.process.pid)
    load = run_wrk(
        settings.wrk_path, url, target.request,
        seconds=settings.seconds, connections=settings.connections, **common,
    )  # fmt: skip
    cpu_after = process_tree_cpu_seconds(target.process.pid)
    target.process.check_alive(target.name)
    cpu_us = (cpu_after - cpu_before) * 1e6 / load.requests if load.requests else float("nan")
    return load, cpu_us
