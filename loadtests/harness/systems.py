"""What runs under and around the load: nginx (a fixed-answer upstream, an HTTP proxy, a
gRPC proxy), merlin-dp's gateway and controller, and redis-server. For each, the argv to
start it with this interpreter and, where a benchmark needs one, a start-and-wait-until-
ready on a :class:`~loadtests.harness.processes.ProcessSet`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loadtests.harness.errors import HarnessError
from loadtests.harness.ports import wait_for_http_ok, wait_for_port
from loadtests.harness.processes import ChildProcess, ProcessSet
from merlin_dp.common.net import LOOPBACK

# The checkout: `python -m` children run from here so they import this tree's code.
REPO_ROOT = Path(__file__).resolve().parents[2]
# What the upstream answers to every request.
UPSTREAM_BODY = '{"predictions":[1,0,2]}'


# --- nginx ----------------------------------------------------------------------------


def nginx_main_conf(prefix: Path, events_and_http: str) -> str:
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{events_and_http}"""


def nginx_http_common(prefix: Path) -> str:
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
    return nginx_main_conf(prefix, f"""\
events {{ worker_connections 4096; }}
http {{
{nginx_http_common(prefix)}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        default_type application/json;
        location / {{ return 200 '{escaped}'; }}
    }}
}}
""")  # fmt: skip


def nginx_proxy_conf(prefix: Path, port: int, upstream: str, *, mirror: bool = False) -> str:
    """nginx (one process) proxying everything to `upstream` over kept-alive HTTP/1.1.

    `mirror`: a copy of every request to `upstream` too (the ``mirror`` directive), the
    native reference for a 100% mirror. nginx sends the copies and compares nothing; it
    holds the client's next request on a kept-alive connection until the copy is
    answered."""
    copy = "mirror /mirror;\n            mirror_request_body on;\n            " if mirror else ""
    mirror_location = (
        """
        location = /mirror {
            internal;
            proxy_pass http://bench_upstream$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }"""
        if mirror
        else ""
    )
    return nginx_main_conf(prefix, f"""\
events {{ worker_connections 4096; }}
http {{
{nginx_http_common(prefix)}
    upstream bench_upstream {{
        server {upstream};
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        location / {{
            {copy}proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}{mirror_location}
    }}
}}
""")  # fmt: skip


def nginx_grpc_proxy_conf(prefix: Path, port: int, upstream: str, *, keepalive: bool = True) -> str:
    """nginx (one process) with ``grpc_pass`` to `upstream` over h2c. nginx doesn't
    multiplex calls on upstream connections: each call in flight holds one, and without
    ``keepalive`` in the upstream block (`keepalive=False`, for comparison only) every
    call opens and closes its own."""
    reuse = (
        """
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 300s;"""
        if keepalive
        else ""
    )
    return nginx_main_conf(prefix, f"""\
events {{ worker_connections 4096; }}
http {{
{nginx_http_common(prefix)}
    http2_max_concurrent_streams 1024;
    upstream bench_grpc_upstream {{
        server {upstream};{reuse}
    }}
    server {{
        listen {LOOPBACK}:{port} http2 backlog=4096;
        location / {{
            grpc_pass grpc://bench_grpc_upstream;
        }}
    }}
}}
""")  # fmt: skip


def nginx_config_test(
    nginx_path: str, conf: Path, prefix: Path
) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on `conf` (the result; returncode 0 when valid)."""
    argv = [nginx_path, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def start_nginx(
    procs: ProcessSet,
    name: str,
    conf_text: Callable[[Path], str],
    *,
    nginx_path: str,
    port: int,
    workdir: Path,
    cpus: str | None,
) -> ChildProcess:
    """Start one nginx process from `conf_text(prefix)` in `workdir/name`; wait for `port`."""
    prefix = workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text(prefix))
    argv = [nginx_path, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    proc = procs.start(name, argv, cpus=cpus, log_path=prefix / "stdout.log")
    wait_for_port(LOOPBACK, port, proc=proc)
    return proc


# --- merlin-dp ------------------------------------------------------------------------


def command_module(root: Path | None) -> str:
    """The module that is the `merlin-dp` command in checkout `root` (None: this one).

    A baseline checkout from before the one-package layout has no ``merlin_dp``; asked for
    ``-m merlin_dp`` there, Python would find this checkout's editable install instead and
    the A/B run would compare the gateway with itself. So it is told which one to run, or
    refused."""
    if root is None or (root / "merlin_dp" / "__main__.py").is_file():
        return "merlin_dp"
    if (root / "controller" / "cli.py").is_file():
        return "controller.cli"  # the layout before merlin_dp (up to commit e12a798)
    raise HarnessError(f"{root}: no merlin_dp/__main__.py or controller/cli.py: not a checkout")


def gateway_argv(
    source: Sequence[str],
    port: int,
    admin_port: int,
    extra_args: Sequence[str] = (),
    module: str = "merlin_dp",
) -> list[str]:
    """`merlin-dp gateway` with this interpreter (no shim in between: the pid is the
    server), its routes from `source`: ``--routes FILE``, ``--controller URL`` or
    ``--redis URL``; ``module`` is the command's module (:func:`command_module`)."""
    return [
        sys.executable, "-m", module, "gateway",
        *source,
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
    name: str = "gateway",
    root: Path | None = None,
) -> ChildProcess:
    """Start the gateway on a route file and wait until its port accepts and /readyz
    answers 200.

    `name` names the process in messages and its log, `workdir/<name>.log`; with `root`,
    the gateway runs from that checkout (`python -m` imports from the working directory).
    """
    argv = gateway_argv(
        ["--routes", str(routes_file)], port, admin_port, extra_args, command_module(root)
    )
    proc = procs.start(name, argv, cpus=cpus, log_path=workdir / f"{name}.log", cwd=root)
    wait_for_port(LOOPBACK, port, proc=proc)
    wait_for_http_ok(LOOPBACK, admin_port, "/readyz", proc=proc)
    return proc


def controller_argv(port: int, state_dir: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """`merlin-dp controller` (local runtime) with this interpreter."""
    return [
        sys.executable, "-m", "merlin_dp", "controller",
        "--state-dir", str(state_dir),
        "--listen", f"{LOOPBACK}:{port}",
        "--runtime", "local",
        "--log-level", "WARNING",
        *extra_args,
    ]  # fmt: skip


# --- redis ----------------------------------------------------------------------------


def redis_argv(redis_path: str, port: int, data_dir: Path | None = None) -> list[str]:
    """A private redis-server on 127.0.0.1:`port`: nothing persisted, or with `data_dir`
    an append-only file there, synced on every write, so a restart brings the data back."""
    persist = (
        ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(data_dir)]
        if data_dir is not None
        else ["--appendonly", "no"]
    )
    return [redis_path, "--port", str(port), "--bind", LOOPBACK, "--save", "", *persist]
