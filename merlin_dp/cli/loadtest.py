"""``merlin-dp loadtest``: a Locust suite run headless for a bounded time, then a summary.

Runs ``merlin_dp/loadtest/locust_model.py`` (the model's stable URL),
``merlin_dp/loadtest/locust_version.py`` (its version endpoints, called directly) or
``merlin_dp/loadtest/locust_upi.py`` (a UPI_V1 model over gRPC: ``--gateway`` is then the gateway's
gRPC port, ``http://127.0.0.1:8082`` with ``merlin-dp up``) against a running
gateway (``merlin-dp up`` or ``merlin-dp gateway``) as a child process, for
``--duration`` seconds, and writes into ``--out``:

- ``<suite>_stats.csv``, ``<suite>_failures.csv``, ``<suite>_exceptions.csv``,
  ``<suite>_stats_history.csv`` (Locust's ``--csv``) and ``<suite>.json`` (Locust's
  ``--json-file``: per request name, every counter);
- ``<suite>-summary.json``: the summary below as JSON.

Then it prints one screen: requests/s, p50/p95/p99, errors by kind, and the share of
answers per version. Exit code 0 when nothing failed, 1 when any request failed, 2 when
the run could not happen (Locust missing, gateway unreachable, Locust crashed).

Locust is imported only in the child (it patches the standard library with gevent).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from merlin_dp.loadtest.locust_common import (
    DEFAULT_PAYLOAD,
    format_summary,
    parse_model,
    read_summary,
    write_summary_json,
)

# The suites ship in merlin_dp/loadtest; the child imports them from the same tree as us.
SUITE_DIR = Path(__file__).resolve().parent.parent / "loadtest"
PACKAGE_ROOT = SUITE_DIR.parent.parent
SUITES = {
    "model": SUITE_DIR / "locust_model.py",
    "version": SUITE_DIR / "locust_version.py",
    "upi": SUITE_DIR / "locust_upi.py",  # --gateway is then the gateway's gRPC port
}
# Locust's own grace after the run time, then ours on top of it.
STOP_TIMEOUT_S = 5
KILL_MARGIN_S = 60


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "loadtest",
        help="run a Locust suite headless against a gateway and summarise it",
        description=(
            "Load a model's stable URL (--suite model), its version endpoints (--suite "
            "version) or a UPI_V1 model over gRPC (--suite upi, --gateway the gRPC port) "
            "through a running gateway with Locust, headless, for --duration "
            "seconds; write Locust's CSV and JSON plus a summary into --out and print "
            "requests/s, p50/p95/p99, errors by kind and the share of answers per version. "
            "Needs Locust: pip install -e '.[loadtest]'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="PROJECT/MODEL")
    p.add_argument("--gateway", default="http://127.0.0.1:8080", metavar="URL",
                   help="the gateway's traffic address")  # fmt: skip
    p.add_argument("--suite", choices=sorted(SUITES), default="model")
    p.add_argument("--versions", default="1", metavar="V,V",
                   help="--suite version: the version endpoints to call")  # fmt: skip
    p.add_argument("--users", type=int, default=16, help="concurrent Locust users")
    p.add_argument("--spawn-rate", type=float, default=0, metavar="PER_SECOND",
                   help="users started per second (0: all at once)")  # fmt: skip
    p.add_argument("--duration", type=float, default=30, metavar="SECONDS",
                   help="how long the load runs")  # fmt: skip
    p.add_argument("--payload", default=DEFAULT_PAYLOAD, metavar="JSON", help="request body")
    p.add_argument("--domain", default="localhost",
                   help="domain of model URLs: <model>.<project>.<domain>")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("loadtest-results"), metavar="DIR",
                   help="where the CSV and JSON files go")  # fmt: skip
    p.set_defaults(run=run)


def locust_argv(args: argparse.Namespace, prefix: Path) -> list[str]:
    users = max(1, args.users)
    rate = args.spawn_rate if args.spawn_rate > 0 else users
    return [
        sys.executable, "-m", "locust",
        "-f", str(SUITES[args.suite]),
        "--headless", "--only-summary",
        "--host", args.gateway.rstrip("/"),
        "-u", str(users), "-r", f"{rate:g}",
        "--run-time", f"{max(1, round(args.duration))}s",
        "--stop-timeout", str(STOP_TIMEOUT_S),
        "--csv", str(prefix),
        "--json-file", str(prefix),
        "--loglevel", "WARNING",
        "--model", args.model,
        "--versions", args.versions,
        "--domain", args.domain,
        "--payload", args.payload,
    ]  # fmt: skip


def reachable(url: str, timeout: float = 2.0) -> str:
    """An empty string if something listens at the URL's host and port, else why not."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return f"{url!r} is not an http://HOST:PORT URL"
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout):
            return ""
    except OSError as exc:
        return f"nothing answers at {url}: {exc}"


def run(args: argparse.Namespace) -> int:
    try:
        parse_model(args.model)
    except ValueError as exc:
        print(f"merlin-dp loadtest: {exc}", file=sys.stderr)
        return 2
    if args.duration <= 0 or args.users < 1:
        print("merlin-dp loadtest: --duration and --users must be positive", file=sys.stderr)
        return 2
    if importlib.util.find_spec("locust") is None:
        print("merlin-dp loadtest: Locust is not installed: pip install -e '.[loadtest]'",
              file=sys.stderr)  # fmt: skip
        return 2
    problem = reachable(args.gateway)
    if problem:
        print(f"merlin-dp loadtest: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / args.suite
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )}  # fmt: skip
    print(
        f"merlin-dp loadtest: {args.suite} suite, {args.users} users, {args.duration:g} s "
        f"against {args.gateway} ({args.model})",
        flush=True,
    )
    started = time.monotonic()
    try:
        done = subprocess.run(
            locust_argv(args, prefix),
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=args.duration + STOP_TIMEOUT_S + KILL_MARGIN_S,
        )
    except subprocess.TimeoutExpired:
        print("merlin-dp loadtest: Locust did not stop in time; killed", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    stats = Path(f"{prefix}_stats.csv")
    if not stats.exists():
        print(f"merlin-dp loadtest: Locust exited {done.returncode} without results:\n"
              f"{done.stderr[-3000:]}", file=sys.stderr)  # fmt: skip
        return 2
    summary = read_summary(prefix)
    summary_path = args.out / f"{args.suite}-summary.json"
    write_summary_json(summary, summary_path, {
        "suite": args.suite, "model": args.model, "gateway": args.gateway,
        "users": args.users, "duration_s": args.duration, "elapsed_s": round(elapsed, 1),
    })  # fmt: skip
    files = [stats, Path(f"{prefix}_failures.csv"), Path(f"{prefix}.json"), summary_path]
    title = f"{args.model} via {args.gateway}, {args.suite} suite, {args.users} users, " + (
        f"{args.duration:g} s"
    )
    print(format_summary(summary, title, [f for f in files if f.exists()]))
    return 1 if summary.failures else 0
