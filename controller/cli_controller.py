"""`merlin-dp controller`: the control plane API and the local runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from autoscaler.scaler import add_timing_arguments, timings_from
from gateway.cli import split_address


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "controller",
        help="run the controller (routing API, version endpoints, route-table feed)",
        description=(
            "Serve the routing API under /v1/projects/{project}/models/{model}, keep state in "
            "--state-dir, run version endpoints with the local runtime, and stream route "
            "tables to gateways (merlin-dp gateway --controller URL)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--state-dir", type=Path, default=Path(".merlin-dp"), help="where state lives")
    p.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT")
    p.add_argument("--store", default="", metavar="redis://HOST:PORT/DB",
                   help="share state through Redis (default: a file in --state-dir)")  # fmt: skip
    p.add_argument("--tokens", type=Path, metavar="FILE",
                   help="bearer tokens (YAML); or set MERLIN_DP_TOKENS")  # fmt: skip
    p.add_argument("--max-versions", type=int, default=2,
                   help="version endpoints deployed at once per model")  # fmt: skip
    p.add_argument("--domain", default="localhost")
    p.add_argument("--runtime", choices=["local", "none"], default="local",
                   help="where replicas run; 'none' only records state")  # fmt: skip
    p.add_argument("--gateway-admin", action="append", default=[], metavar="URL",
                   help="a gateway's admin URL (repeat for each gateway): run the autoscaler "
                   "on their request signals; gateways poke it at /v1/activations")  # fmt: skip
    p.add_argument("--redis-signals", action="store_true",
                   help="run the autoscaler on the signals gateways started with --redis push "
                   "to the --store Redis (no gateway list needed)")  # fmt: skip
    add_timing_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvloop

    from controller.server import ControllerConfig, serve

    host, port = split_address(args.listen)
    config = ControllerConfig(
        state_dir=args.state_dir, host=host, port=port, tokens_file=args.tokens,
        max_versions=args.max_versions, domain=args.domain, runtime=args.runtime,
        store=args.store, gateway_admin_urls=tuple(args.gateway_admin),
        autoscaler_timings=timings_from(args), redis_signals=args.redis_signals,
    )  # fmt: skip
    if (args.gateway_admin or args.redis_signals) and args.runtime == "none":
        raise SystemExit("merlin-dp controller: the autoscaler needs a runtime to scale")
    if args.redis_signals and not args.store.startswith("redis"):
        raise SystemExit("merlin-dp controller: --redis-signals needs --store redis://...")
    if args.redis_signals and args.gateway_admin:
        raise SystemExit("merlin-dp controller: --gateway-admin or --redis-signals, not both")
    uvloop.run(serve(config))
    return 0
