"""`merlin-dp controller`: the control plane API and the local runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merlin_dp.cli.autoscaling import add_timing_arguments, timings_from
from merlin_dp.cli.gateway import split_address


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
    p.add_argument("--model-root", type=Path, action="append", default=[], metavar="DIR",
                   help="tokens without host: true may deploy pyfunc / sklearn models from "
                   "directories under DIR (repeat for more; docs/security.md)")  # fmt: skip
    p.add_argument("--max-versions", type=int, default=2,
                   help="version endpoints deployed at once per model")  # fmt: skip
    p.add_argument("--domain", default="localhost", help="the gateways' domain, for model URLs")
    p.add_argument("--public-http-port", type=int, default=8080, metavar="PORT",
                   help="the gateways' public HTTP port, for model URLs")  # fmt: skip
    p.add_argument("--public-grpc-port", type=int, default=8082, metavar="PORT",
                   help="the gateways' public gRPC port, for UPI_V1 model URLs "
                   "(0: no gateway serves gRPC)")  # fmt: skip
    p.add_argument("--runtime", choices=["local", "none"], default="local",
                   help="where replicas run; 'none' only records state")  # fmt: skip
    p.add_argument("--gateway-admin", action="append", default=[], metavar="URL",
                   help="a gateway's admin URL (repeat for each gateway): run the autoscaler "
                   "on their request signals; gateways poke it at /v1/activations")  # fmt: skip
    p.add_argument("--redis-signals", action="store_true",
                   help="run the autoscaler on the signals gateways started with --redis push "
                   "to the --store Redis (no gateway list needed)")  # fmt: skip
    k8s = p.add_argument_group(
        "Kubernetes mode", "route tables from ModelEndpoints and EndpointSlices, scaling "
        "through deployments/scale (docs/kubernetes.md)")  # fmt: skip
    k8s.add_argument("--kubernetes", action="store_true",
                     help="follow the cluster instead of running replicas (implies --runtime "
                     "none; the API's routing writes become ModelEndpoint patches)")  # fmt: skip
    k8s.add_argument("--namespace", default="",
                     help="where ModelEndpoints, EndpointSlices and the Lease live "
                     "(default: the pod's namespace, else 'default')")  # fmt: skip
    k8s.add_argument("--kube-api", default="", metavar="URL",
                     help="a plain-HTTP API URL with no credentials (kubectl proxy); "
                     "default: the pod's service account, else the kubeconfig")  # fmt: skip
    k8s.add_argument("--kubeconfig", default="", metavar="FILE")
    k8s.add_argument("--no-leader-election", dest="leader_election", action="store_false",
                     help="act without the merlin-dp-controller Lease "
                     "(only one controller!)")  # fmt: skip
    k8s.add_argument("--identity", default="", help="this controller's name in the Lease "
                     "(default: host name and pid)")  # fmt: skip
    k8s.add_argument("--lease-seconds", type=float, default=15.0,
                     help="a leader not renewing for this long is replaced")  # fmt: skip
    k8s.add_argument("--gateway-admin-service", default="", metavar="NAME",
                     help="run the autoscaler on the signals of every gateway behind this "
                     "headless Service (found through its EndpointSlices)")  # fmt: skip
    k8s.add_argument("--resync-seconds", type=float, default=300.0,
                     help="relist everything this often even when watches are healthy")  # fmt: skip
    add_timing_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvloop

    from merlin_dp.controller.server import ControllerConfig, StartError, serve

    host, port = split_address(args.listen)
    config = ControllerConfig(
        state_dir=args.state_dir, host=host, port=port, tokens_file=args.tokens,
        model_roots=tuple(args.model_root),
        max_versions=args.max_versions, domain=args.domain, runtime=args.runtime,
        store=args.store, gateway_admin_urls=tuple(args.gateway_admin),
        autoscaler_timings=timings_from(args), redis_signals=args.redis_signals,
        kubernetes=args.kubernetes, kube_api=args.kube_api, kubeconfig=args.kubeconfig,
        namespace=args.namespace, leader_election=args.leader_election, identity=args.identity,
        lease_seconds=args.lease_seconds, resync_seconds=args.resync_seconds,
        gateway_admin_service=args.gateway_admin_service,
        public_http_port=args.public_http_port, public_grpc_port=args.public_grpc_port or None,
    )  # fmt: skip
    if args.gateway_admin_service and not args.kubernetes:
        raise SystemExit("merlin-dp controller: --gateway-admin-service needs --kubernetes")
    if args.gateway_admin_service and (args.gateway_admin or args.redis_signals):
        raise SystemExit("merlin-dp controller: one source of signals: --gateway-admin, "
                         "--gateway-admin-service or --redis-signals")  # fmt: skip
    if args.lease_seconds < 1 or args.resync_seconds < 1:
        raise SystemExit("merlin-dp controller: --lease-seconds and --resync-seconds are >= 1")
    scaling = args.gateway_admin or args.redis_signals
    if scaling and args.runtime == "none" and not args.kubernetes:
        raise SystemExit("merlin-dp controller: the autoscaler needs a runtime to scale")
    if args.redis_signals and not args.store.startswith("redis"):
        raise SystemExit("merlin-dp controller: --redis-signals needs --store redis://...")
    if args.redis_signals and args.gateway_admin:
        raise SystemExit("merlin-dp controller: --gateway-admin or --redis-signals, not both")
    if not 0 < args.public_http_port < 65536 or not 0 <= args.public_grpc_port < 65536:
        raise SystemExit("merlin-dp controller: --public-http-port is 1-65535, "
                         "--public-grpc-port 0-65535")  # fmt: skip
    try:
        uvloop.run(serve(config))
    except StartError as exc:
        print(f"merlin-dp controller: {exc}", file=sys.stderr)
        return 1
    return 0
