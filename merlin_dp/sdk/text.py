"""The API's records as text for people: the tables the CLI prints and what ``print()``
shows in a notebook. Functions of the SDK's models only."""

from __future__ import annotations

import time

from merlin_dp.controller.models import ModelEndpoint, RuleRevision, VersionEndpoint
from merlin_dp.spec.rollout import RolloutStatus
from merlin_dp.spec.rule import Rule


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def versions_text(versions: list[VersionEndpoint]) -> str:
    """A table of versions, then each one's message in full: a failure's reason and the
    log lines it quotes are the point, so they are not cut to fit a column."""
    ordered = sorted(versions, key=lambda v: v.version)
    rows = [[v.version, v.status, str(len(v.replicas)), v.spec.protocol, v.url or "-"]
            for v in ordered]  # fmt: skip
    text = table(rows, ["version", "status", "ready", "protocol", "url"])
    for v in ordered:
        if v.message:
            first, *rest = v.message.splitlines()
            text += f"\n\nversion {v.version} ({v.status}): {first}"
            text += "".join(f"\n    {line}" for line in rest)
    return text


def version_line(name: str, v: VersionEndpoint) -> str:
    line = f"{name}: {v.status}  {v.url}"
    if v.spec.protocol == "UPI_V1" and v.url:
        line += "  (a gRPC target; its host is the :authority the gateway routes by)"
    return line + (f"\n{v.message}" if v.message else "")


def describe_rule(rule: Rule) -> str:
    parts = [" ".join(f"{d.version}={d.weight}%" for d in rule.destinations)]
    for m in rule.match:
        test = f"={m.exact}" if m.exact is not None else f"~{m.regex}"
        parts.append(f"match {m.header}{test} -> {m.version}")
    if rule.sticky:
        s = rule.sticky
        parts.append(f"sticky {'header ' + s.header if s.header else f'cookie {s.cookie}'}")
    if rule.mirror:
        parts.append(f"mirror {rule.mirror.percent:g}% -> {rule.mirror.version}")
    return "; ".join(parts)


def endpoint_line(name: str, endpoint: ModelEndpoint) -> str:
    return f"{name} (revision {endpoint.revision}): {describe_rule(endpoint.rule)}"


def history_text(history: list[RuleRevision]) -> str:
    rows = [[str(h.revision), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.at)), h.by,
             describe_rule(h.rule)] for h in history]  # fmt: skip
    return table(rows, ["revision", "at", "by", "rule"])


def status_text(
    name: str,
    endpoint: ModelEndpoint | None,
    versions: list[VersionEndpoint],
    rollout: RolloutStatus | None,
) -> str:
    e = endpoint
    head = (f"{e.url}  revision {e.revision}: {describe_rule(e.rule)}" if e
            else f"{name}: no model endpoint yet")  # fmt: skip
    text = head + "\n\n" + versions_text(versions)
    if rollout is not None and rollout.active:
        text += "\n\nrollout: " + rollout_text(rollout).splitlines()[0]
    return text


def rollout_text(s: RolloutStatus) -> str:
    where = "shadowing all traffic" if s.phase == "shadow" else f"{s.weight}% to candidate"
    if s.phase not in ("shadow", "canary"):
        where = s.phase.replace("_", " ")
    head = (f"{s.project}/{s.model}: {s.baseline} -> {s.candidate}: {where}"
            + (" (paused)" if s.paused else ""))  # fmt: skip
    if s.phase == "canary":
        steps = s.plan.steps
        head += f", step {s.step + 1} of {len(steps)} ({', '.join(map(str, steps))})"
    lines = [head]
    if s.message:
        lines.append(s.message)
    if s.tests:
        rows = [[t.metric, f"{100 * t.baseline:.3g}%", f"{100 * t.candidate:.3g}%",
                 f"{100 * t.margin:.3g}%", str(t.samples), f"{t.llr:g}",
                 f"{t.pass_at:g} / {t.fail_at:g}", t.verdict]
                for t in s.tests]  # fmt: skip
        lines += ["", table(rows, ["test", "baseline", "candidate", "regression at", "answers",
                                   "llr", "pass / fail", "verdict"])]  # fmt: skip
    if s.decisions:
        rows = [[time.strftime("%H:%M:%S", time.localtime(d.at)), d.action,
                 f"{d.weight}%", str(d.revision or "-"), d.reason]
                for d in s.decisions]  # fmt: skip
        lines += ["", table(rows, ["at", "action", "weight", "revision", "reason"])]
    return "\n".join(lines)
