"""`merlin-dp` client commands: the controller's API from a terminal.

Each command is one or two API calls; output is a readable table, or the API's JSON with
``-o json``. The controller's address comes from ``--controller`` or
``$MERLIN_DP_CONTROLLER`` (default http://127.0.0.1:8090), the token from ``--token`` or
``$MERLIN_DP_TOKEN``. API errors are printed as the API states them, exit code 1.
Every command works from any directory: nothing is read from the state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from merlin_dp.sdk.client import DEFAULT_CONTROLLER, Client
from merlin_dp.sdk.errors import MerlinError, Unreachable, WaitTimeout
from merlin_dp.sdk.operations import split_name
from merlin_dp.sdk.text import (
    endpoint_line,
    history_text,
    version_line,
    versions_text,
)


class CliError(Exception):
    pass


def client(args: argparse.Namespace) -> Client:
    """The SDK's client, as the command line configured it."""
    return Client(args.controller, args.token or "")


def names(text: str, parts: int) -> list[str]:
    try:
        return split_name(text, parts)
    except ValueError as exc:
        raise CliError(str(exc)) from None


# --- output -----------------------------------------------------------------------------


def show(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(jsonable(data), indent=2) if args.output == "json" else text)


def jsonable(data: Any) -> Any:
    """The API's JSON for SDK results (models, lists and dicts of them)."""
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, dict):
        return {k: jsonable(v) for k, v in data.items()}
    if isinstance(data, list):
        return [jsonable(v) for v in data]
    return data


# --- commands ---------------------------------------------------------------------------


def cmd_deploy(args: argparse.Namespace) -> None:
    names(args.name, 3)
    if args.wait < 0:
        raise CliError("--wait is a number of seconds, 0 or more")
    body: dict[str, Any] = {
        "type": args.type,
        "protocol": args.protocol,
        "resource_request": {"min_replica": args.min_replica, "max_replica": args.max_replica,
                             "cpu_request": args.cpu, "memory_request": args.memory},
        "autoscaling_policy": {"metrics_type": args.metric, "target_value": args.target},
        "env_vars": dict(parse_pair(e, "=") for e in args.env),
    }  # fmt: skip
    if args.ready_deadline is not None:
        body["ready_deadline_seconds"] = args.ready_deadline
    if args.container_concurrency is not None:
        body["container_concurrency"] = args.container_concurrency
    if args.type == "custom":
        if not args.command:
            raise CliError("type custom needs --command 'program args…'")
        body["command"] = shlex.split(args.command)
        # The command runs where it was typed, as it would in this shell: relative paths in
        # it (and those its program opens) are this directory's, wherever the controller
        # runs. Like --model-dir, resolved here, where the caller's directory is known.
        body["workdir"] = str(Path(args.workdir or ".").resolve())
    else:
        if args.workdir:
            raise CliError(f"--workdir is for --type custom; {args.type} reads --model-dir")
        body["model_dir"] = str(Path(args.model_dir).resolve()) if args.model_dir else ""
        body["pyfunc_class"] = args.pyfunc_class or ""
    try:
        result = client(args).deploy(args.name, spec=body, wait=args.wait)
    except WaitTimeout as exc:
        show_failure(args, exc.version)
        raise CliError(f"{exc} (its output: merlin-dp logs {args.name})") from None
    except MerlinError as exc:
        show_failure(args, getattr(exc, "version", None))
        raise
    show(args, result, version_line(args.name, result))


def show_failure(args: argparse.Namespace, version: Any) -> None:
    """With -o json, the version's record on stdout beside the error on stderr."""
    if args.output == "json" and version is not None:
        show(args, version, "")


def parse_pair(text: str, sep: str) -> tuple[str, str]:
    key, found, value = text.partition(sep)
    if not found or not key:
        raise CliError(f"{text!r} is not KEY{sep}VALUE")
    return key, value


def cmd_undeploy(args: argparse.Namespace) -> None:
    result = client(args).undeploy(args.name)
    show(args, result, f"{args.name}: {result.status}")


def cmd_versions(args: argparse.Namespace) -> None:
    versions = client(args).versions(args.name)
    show(args, {"versions": versions}, versions_text(versions))


def build_rule(args: argparse.Namespace) -> dict[str, Any]:
    if args.rule_file:
        loaded = yaml.safe_load(Path(args.rule_file).read_text())
        rule: dict[str, Any] = loaded.get("rule", loaded)
        return rule
    if not args.weights:
        raise CliError("give --weights 1=90,2=10 (or --rule-file FILE)")
    rule = {"destinations": []}
    for item in args.weights.split(","):
        version, weight = parse_pair(item.strip(), "=")
        if not weight.isdigit():
            raise CliError(f"weight {weight!r} of version {version} is not a whole number")
        rule["destinations"].append({"version": version, "weight": int(weight)})
    rule["match"] = []
    for spec in args.match:
        m = re.fullmatch(r"([^=~]+)(=|~)(.*):([^:]+)", spec)
        if m is None:
            raise CliError(f"--match {spec!r}: use HEADER=VALUE:VERSION or HEADER~REGEX:VERSION")
        header, op, value, version = m.groups()
        rule["match"].append({"header": header, "version": version,
                              ("exact" if op == "=" else "regex"): value})  # fmt: skip
    if args.sticky:
        kind, _, name = args.sticky.partition(":")
        if kind not in ("header", "cookie") or not name:
            raise CliError("--sticky header:NAME or --sticky cookie:NAME")
        rule["sticky"] = {kind: name}
    if args.mirror:
        version, percent = parse_pair(args.mirror, ":")
        rule["mirror"] = {"version": version, "percent": float(percent)}
    if args.timeout is not None:
        rule["timeout_seconds"] = args.timeout
    return rule


def cmd_route(args: argparse.Namespace) -> None:
    result = client(args).route(args.name, rule=build_rule(args), protocol=args.protocol)
    show(args, result, endpoint_line(args.name, result))


def cmd_switch(args: argparse.Namespace) -> None:
    result = client(args).switch(args.name, args.to)
    show(args, result, endpoint_line(args.name, result))


def cmd_rollback(args: argparse.Namespace) -> None:
    result = client(args).rollback(args.name, args.to_revision)
    show(args, result, endpoint_line(args.name, result))


def cmd_history(args: argparse.Namespace) -> None:
    history = client(args).history(args.name)
    show(args, {"history": history}, history_text(history))


def cmd_status(args: argparse.Namespace) -> None:
    status = client(args).status(args.name)
    data = {"endpoint": status.endpoint, "versions": status.versions}
    show(args, data, str(status))


def cmd_logs(args: argparse.Namespace) -> None:
    names(args.name, 3)
    if args.lines < 0:
        raise CliError("--lines is 0 or more")
    if args.follow:
        try:
            # No timeout: a quiet log sends nothing for as long as it is quiet.
            for line in client(args).follow_logs(args.name, args.lines):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            return
        except Unreachable as exc:
            raise CliError(f"lost the controller at {args.controller}: {exc}") from None
        raise CliError(f"the controller at {args.controller} ended the stream (stopping?)")
    result = client(args).logs(args.name, args.lines)
    if not result.logs:
        raise CliError(f"no replica logs for {args.name} yet")
    blocks = [f"==> {entry.name} <==\n" + "\n".join(entry.lines) for entry in result.logs]
    if result.omitted:
        blocks.insert(0, f"({result.omitted} older log files not shown)")
    show(args, result, "\n\n".join(blocks))


# --- wiring ---------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """--controller, --token and -o: what every client command takes."""
    common = argparse.ArgumentParser(add_help=False)
    controller = os.environ.get("MERLIN_DP_CONTROLLER", DEFAULT_CONTROLLER)
    common.add_argument(
        "--controller", default=controller, help="controller URL (default $MERLIN_DP_CONTROLLER)"
    )
    common.add_argument("--token", default=os.environ.get("MERLIN_DP_TOKEN"),
                        help="API token (default $MERLIN_DP_TOKEN)")  # fmt: skip
    common.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return common


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = common_options()

    p = sub.add_parser("deploy", parents=[common], help="deploy or redeploy a version endpoint")
    p.add_argument("name", metavar="PROJECT/MODEL/VERSION")
    p.add_argument("--type", choices=["custom", "pyfunc", "sklearn"], default="custom")
    p.add_argument("--command", help="custom: the command line that serves the model")
    p.add_argument("--model-dir", help="pyfunc/sklearn: the artifact directory")
    p.add_argument("--pyfunc-class", help="pyfunc: module:Class in the model dir")
    p.add_argument("--protocol", choices=["HTTP_JSON", "UPI_V1"], default="HTTP_JSON")
    p.add_argument("--min-replica", type=int, default=1)
    p.add_argument("--max-replica", type=int, default=2)
    p.add_argument("--cpu", default="500m")
    p.add_argument("--memory", default="512Mi")
    metrics = ["cpu_utilization", "memory_utilization", "rps", "concurrency"]
    p.add_argument("--metric", default="concurrency", choices=metrics)
    p.add_argument("--target", type=float, default=1.0, help="autoscaling target value")
    p.add_argument("--container-concurrency", type=int, metavar="N",
                   help="requests one replica serves at once; the gateway queues the rest "
                   "(0: no limit; default 4)")  # fmt: skip
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", metavar="DIR",
                   help="custom: where the command runs (default: this directory)")  # fmt: skip
    p.add_argument("--ready-deadline", type=float, metavar="SECONDS",
                   help="fail it if no replica is ready by then (default 120)")  # fmt: skip
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to this long for it to run; exit 1 if it failed or is still "
                   "pending")  # fmt: skip
    p.set_defaults(run=wrap(cmd_deploy))

    p = sub.add_parser("undeploy", parents=[common], help="undeploy a version endpoint")
    p.add_argument("name", metavar="PROJECT/MODEL/VERSION")
    p.set_defaults(run=wrap(cmd_undeploy))

    p = sub.add_parser("versions", parents=[common], help="list a model's version endpoints")
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.set_defaults(run=wrap(cmd_versions))

    p = sub.add_parser(
        "route", parents=[common], help="set the model endpoint's rule",
        description="Examples: route fraud/scorer --weights 1=90,2=10; "
        "--match 'X-Tenant~^beta-:2' --match 'X-Model-Version=2:2'; --sticky header:X-User; "
        "--mirror 2:0.5; or --rule-file rule.yaml",
    )  # fmt: skip
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.add_argument("--weights", metavar="V=W,...")
    p.add_argument("--match", action="append", default=[], metavar="HEADER=VALUE:V|HEADER~RE:V")
    p.add_argument("--sticky", metavar="header:NAME|cookie:NAME")
    p.add_argument("--mirror", metavar="VERSION:PERCENT")
    p.add_argument("--timeout", type=float, metavar="SECONDS")
    p.add_argument("--protocol", choices=["HTTP_JSON", "UPI_V1"], default="HTTP_JSON")
    p.add_argument("--rule-file", metavar="FILE", help="a YAML/JSON rule instead of the flags")
    p.set_defaults(run=wrap(cmd_route))

    p = sub.add_parser(
        "switch", parents=[common], help="blue-green: all traffic to the other version"
    )
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.add_argument("--to", metavar="VERSION")
    p.set_defaults(run=wrap(cmd_switch))

    p = sub.add_parser(
        "rollback", parents=[common], help="return to the previous (or a given) rule"
    )
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.add_argument("--to-revision", type=int, metavar="R")
    p.set_defaults(run=wrap(cmd_rollback))

    p = sub.add_parser("history", parents=[common], help="the model endpoint's last rules")
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.set_defaults(run=wrap(cmd_history))

    p = sub.add_parser("status", parents=[common], help="a model's endpoint and versions")
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.set_defaults(run=wrap(cmd_status))

    p = sub.add_parser(
        "logs", parents=[common], help="a version endpoint's replica logs (from the controller)"
    )
    p.add_argument("name", metavar="PROJECT/MODEL/VERSION")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines from the end of each log")
    p.add_argument("-f", "--follow", action="store_true",
                   help="then print new lines as they are written (Ctrl-C stops)")  # fmt: skip
    p.set_defaults(run=wrap(cmd_logs))


def wrap(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except (CliError, MerlinError, ValueError) as exc:
            print(f"merlin-dp: {exc}", file=sys.stderr)
            return 1
        return 0

    return run
