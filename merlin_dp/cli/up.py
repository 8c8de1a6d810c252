"""`merlin-dp up`: the embedded default, everything on one machine in one command.

One process runs the controller (file store and local runtime, state under
``--state-dir``), its API, a gateway that follows it, and the autoscaler reading that
gateway's signals; replicas are its child processes. ``--demo`` trains the iris example
in two versions (if not already there), deploys both with the sklearn server, routes
90/10, and prints where everything is.
Ctrl-C (or SIGTERM) stops the gateway, the API and every replica.

Before it starts anything it takes the state directory's lock (a second ``up`` on the
same directory is refused, naming the first) and checks that its ports are free, so a
refusal leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from merlin_dp.autoscaler.collector import GatewaySignals
from merlin_dp.autoscaler.scaler import Autoscaler
from merlin_dp.cli.autoscaling import add_timing_arguments, timings_from
from merlin_dp.cli.gateway import split_address
from merlin_dp.controller.autoscaling import attach_autoscaler
from merlin_dp.controller.rollouts import RolloutDriver, attach_rollouts
from merlin_dp.controller.server import ControllerConfig, StartError, listen_error, start_controller
from merlin_dp.controller.timeseries import TimeSeries
from merlin_dp.controller.urls import PublicGateway, model_url
from merlin_dp.gateway.admin import admin_app, start_admin
from merlin_dp.gateway.config import GatewayConfig
from merlin_dp.gateway.routing.sources import ControllerRouteSource
from merlin_dp.gateway.worker import GatewayWorker, Report
from merlin_dp.sdk.client import AsyncClient
from merlin_dp.sdk.errors import MerlinError, NotFound

log = logging.getLogger("merlin-dp")

ROOT = Path(__file__).resolve().parents[2]  # the source tree, where examples/ lives
DEMO_PROJECT, DEMO_MODEL = "demo", "iris"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "up",
        help="run everything on this machine: controller, gateway, replicas",
        description=(
            "Run the controller (state in --state-dir), its API, the local runtime and a "
            "gateway following it, in one process tree. --demo deploys an iris classifier "
            "in two versions behind one stable URL. Ctrl-C stops everything."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--state-dir", type=Path, default=Path(".merlin-dp"))
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="traffic")
    p.add_argument("--admin", default="127.0.0.1:8081", metavar="HOST:PORT", help="gateway admin")
    p.add_argument("--api", default="127.0.0.1:8090", metavar="HOST:PORT", help="controller API")
    p.add_argument("--grpc-port", type=int, default=8082, metavar="PORT",
                   help="UPI_V1 (gRPC) on the --listen host (0: any free port)")  # fmt: skip
    p.add_argument("--no-grpc", dest="grpc", action="store_false",
                   help="don't serve UPI_V1 model endpoints")  # fmt: skip
    p.add_argument("--domain", default="localhost")
    p.add_argument("--demo", action="store_true", help="deploy the iris demo (needs scikit-learn)")
    add_timing_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run_up)


def run_up(args: argparse.Namespace) -> int:
    import uvloop

    try:
        uvloop.run(_up(args))
    except (_Failed, StartError) as exc:
        print(f"merlin-dp up: {exc}", file=sys.stderr)
        return 1
    return 0


class _Failed(Exception):
    pass


async def _up(args: argparse.Namespace) -> None:
    api_host, api_port = split_address(args.api)
    host, port = split_address(args.listen)
    admin_host, admin_port = split_address(args.admin)
    grpc_port = args.grpc_port if args.grpc else None
    ports = [("traffic (--listen)", host, port), ("admin (--admin)", admin_host, admin_port)]
    if grpc_port is not None:
        ports.append(("gRPC (--grpc-port)", host, grpc_port))
    controller, api_runner, api_port = await start_controller(
        ControllerConfig(
            state_dir=args.state_dir,
            host=api_host,
            port=api_port,
            domain=args.domain,
            drain_seconds=1.0,
            public_http_port=port,
            public_grpc_port=grpc_port,
        ),
        before_start=lambda: _check_free(ports),
    )
    api_url = f"http://{api_host}:{api_port}"
    config = GatewayConfig(host=host, port=port, admin_host=admin_host, admin_port=admin_port,
                           domain=args.domain, controller_url=api_url,
                           grpc_port=grpc_port)  # fmt: skip
    worker = GatewayWorker(config, ControllerRouteSource(api_url))
    admin_runner = None
    autoscaler: Autoscaler | None = None
    rollouts: RolloutDriver | None = None
    series: TimeSeries | None = None
    try:
        try:
            await worker.start()

            async def reports() -> list[Report]:
                return [worker.report()]

            admin_runner, admin_port = await start_admin(admin_app(reports), admin_host, admin_port)
        except OSError as exc:  # a port taken since _check_free looked
            raise _Failed(f"cannot start the gateway: {exc}") from None
        # The real ports (0 picks one): the URLs the API answers with name them.
        served_grpc = worker.grpc_port if worker.grpc is not None else None
        controller.public = PublicGateway(args.domain, worker.port, served_grpc)
        signals = GatewaySignals([f"http://{admin_host}:{admin_port}"])
        autoscaler = attach_autoscaler(controller, signals, timings=timings_from(args))
        rollouts = attach_rollouts(controller, signals)
        series = controller.series = TimeSeries(lambda: controller.state, signals, autoscaler)
        series.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.demo:
            demo = asyncio.ensure_future(_demo(api_url, args.state_dir))
            await asyncio.wait([demo, asyncio.ensure_future(stop.wait())],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if demo.done():
                demo.result()
        print(_banner(args, controller.public, api_url, f"http://{admin_host}:{admin_port}"),
              flush=True)  # fmt: skip
        await stop.wait()
        print("merlin-dp: stopping (in-flight requests finish, replicas drain)", flush=True)
    finally:
        if series is not None:
            await series.close()
        if rollouts is not None:
            await rollouts.close()
        if autoscaler is not None:
            await autoscaler.close()
        await worker.stop()
        if admin_runner is not None:
            await admin_runner.cleanup()
        await controller.feed.close()
        await api_runner.cleanup()
        await controller.close()


def _check_free(ports: list[tuple[str, str, int]]) -> None:
    """Refuse a taken port before anything starts (the gateway binds only later)."""
    for what, host, port in ports:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # As the gateway binds it. Without SO_REUSEPORT this also fails on a port a
            # multi-worker gateway shares, which the gateway's own bind would silently join.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise StartError(listen_error(host, port, what, exc)) from None


def _banner(args: argparse.Namespace, public: PublicGateway, api: str, admin: str) -> str:
    lines = ["", "merlin-dp is up."]
    if args.demo:
        url = model_url(public, DEMO_PROJECT, DEMO_MODEL, "HTTP_JSON") + "/v1/predict"
        lines += [
            f"  Stable URL:  {url}   (iris version 1 at 90%, version 2 at 10%)",
            f"  Try:         curl -si {url} -d '{{\"instances\": [[5.1, 3.5, 1.4, 0.2]]}}'",
            # requests/httpx/grpcio don't resolve *.localhost here; curl and browsers do.
            f"  No DNS:      http://{args.listen}/serving/{DEMO_PROJECT}/{DEMO_MODEL}/v1/predict"
            "   (path form, for requests/httpx)",
            f"  Status:      merlin-dp status {DEMO_PROJECT}/{DEMO_MODEL} --controller {api}",
            f"  Move traffic: merlin-dp route {DEMO_PROJECT}/{DEMO_MODEL} --weights 1=50,2=50 "
            f"--controller {api}",
        ]
    else:
        pattern = model_url(public, "<project>", "<model>", "HTTP_JSON")
        lines.append(f"  Gateway:     {pattern}/v1/predict")
        lines.append(f"  No DNS:      http://{args.listen}/serving/<project>/<model>/v1/predict")
        lines.append(
            f"  Deploy:      merlin-dp deploy PROJECT/MODEL/1 --command '…' --controller {api}"
        )
    grpc = model_url(public, "<project>", "<model>", "UPI_V1")
    if grpc:
        lines.append(f"  UPI (gRPC):  {grpc}  (h2c; :authority picks the model)")
    lines += [
        f"  Console:     {api}/ui/",
        f"  API:         {api}  (OpenAPI: {api}/openapi.json)",
        f"  Metrics:     {admin}/metrics",
        f"  State, logs: {args.state_dir}/",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def _demo(api: str, state_dir: Path) -> None:
    models = state_dir / "examples" / "iris"
    if not (models / "v2" / "model.joblib").exists():
        print("merlin-dp: training the iris example (v1 logistic regression, v2 random forest)…",
              flush=True)  # fmt: skip
        try:
            sys.path.insert(0, str(ROOT / "examples" / "iris"))
            from train import train  # type: ignore[import-not-found]
        except ImportError as exc:
            raise _Failed(
                f"--demo needs the examples/ directory of the source tree: {exc}"
            ) from None
        try:
            await asyncio.to_thread(train, models)
        except ImportError:
            raise _Failed("--demo needs scikit-learn: pip install -e '.[sklearn]'") from None
    model = f"{DEMO_PROJECT}/{DEMO_MODEL}"
    # Through the SDK, as any client: the demo is two deploys and a route.
    async with AsyncClient(api, token="") as client:
        try:
            for version in ("1", "2"):
                try:
                    current = await client.version(f"{model}/{version}")
                    if current.status in ("pending", "running", "serving"):
                        continue
                except NotFound:
                    pass
                await client.deploy(f"{model}/{version}", model_dir=models / f"v{version}",
                                    ready_deadline=60, wait=0)  # fmt: skip
            for version in ("1", "2"):
                await client.wait(f"{model}/{version}", 90)
            try:
                await client.endpoint(model)
                return  # the demo's rule (or the user's) survives restarts as it was
            except NotFound:
                await client.route(model, {"1": 90, "2": 10})
        except MerlinError as exc:
            raise _Failed(f"the iris demo: {exc}") from None
