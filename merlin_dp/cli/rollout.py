"""`merlin-dp rollout`: start, watch and steer a model endpoint's rollout.

``start`` posts a plan (the defaults, or steps and options given here), ``status`` shows
the phase, step, each test's numbers and every decision (``--watch`` follows it until it
ends), and ``pause``, ``resume`` and ``abort`` steer it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from merlin_dp.cli.client import CliError, client, common_options, show, wrap
from merlin_dp.sdk.text import rollout_text

WATCH_SECONDS = 2.0


def cmd_start(args: argparse.Namespace) -> None:
    plan: dict[str, Any] = {}
    if args.plan_file:
        try:
            loaded = yaml.safe_load(Path(args.plan_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read the plan file {args.plan_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"{args.plan_file} is not a plan (a mapping of its fields)")
        plan.update(loaded)
    plan["candidate"] = args.candidate
    if args.no_shadow:
        plan["shadow"] = False
    if args.steps is not None:
        try:
            plan["steps"] = [int(w) for w in args.steps.split(",") if w.strip()]
        except ValueError:
            raise CliError(
                f"--steps {args.steps!r} is not a list of weights like 1,5,25,50"
            ) from None
    if args.step_seconds is not None:
        plan["step_seconds"] = args.step_seconds
    if args.webhook:
        plan["webhook"] = args.webhook
    if args.no_compare:
        plan["analysis"] = {**plan.get("analysis", {}), "compare_predictions": False}
    plan_body = {k: v for k, v in plan.items() if k != "candidate"}
    result = client(args).start_rollout(args.name, args.candidate, plan_body)
    show(args, result, rollout_text(result))


def cmd_status(args: argparse.Namespace) -> None:
    sdk = client(args)
    result = sdk.rollout(args.name)
    show(args, result, rollout_text(result))
    while args.watch and result.active:
        time.sleep(WATCH_SECONDS)
        result = sdk.rollout(args.name)
        print()
        show(args, result, rollout_text(result))


def action(name: str) -> Callable[[argparse.Namespace], None]:
    def cmd(args: argparse.Namespace) -> None:
        sdk = client(args)
        steer = {"pause": sdk.pause_rollout, "resume": sdk.resume_rollout,
                 "abort": sdk.abort_rollout}[name]  # fmt: skip
        result = steer(args.name)
        show(args, result, rollout_text(result))

    return cmd


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = common_options()
    parser = sub.add_parser(
        "rollout", help="roll a candidate version out by itself (shadow, canary, promote)",
        description="Start, follow and steer a rollout (docs/rollouts.md).",
    )  # fmt: skip
    steps = parser.add_subparsers(title="commands", metavar="<command>", required=True)
    p = steps.add_parser("start", parents=[common], help="start a rollout of a version")
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.add_argument("candidate", metavar="VERSION")
    p.add_argument("--steps", metavar="W,W,...", help="canary weights (default 1,5,25,50)")
    p.add_argument("--step-seconds", type=float, metavar="S",
                   help="least time each step is held (default 30)")  # fmt: skip
    p.add_argument("--no-shadow", action="store_true", help="start at the first canary step")
    p.add_argument("--no-compare", action="store_true",
                   help="while shadowing, judge errors and latency only (a retrained model "
                   "is meant to answer differently)")  # fmt: skip
    p.add_argument("--webhook", metavar="URL",
                   help="POSTed before each step and promotion; non-2xx pauses")  # fmt: skip
    p.add_argument("--plan-file", metavar="FILE",
                   help="a YAML/JSON plan (docs/rollouts.md); the flags override it")  # fmt: skip
    p.set_defaults(run=wrap(cmd_start))
    p = steps.add_parser("status", parents=[common], help="phase, evidence and decisions")
    p.add_argument("name", metavar="PROJECT/MODEL")
    p.add_argument("-w", "--watch", action="store_true", help="follow it until it ends")
    p.set_defaults(run=wrap(cmd_status))
    for name, text in (("pause", "hold it where it is"), ("resume", "let it go on"),
                       ("abort", "stop it and route as before it, in one revision")):  # fmt: skip
        p = steps.add_parser(name, parents=[common], help=text)
        p.add_argument("name", metavar="PROJECT/MODEL")
        p.set_defaults(run=wrap(action(name)))
