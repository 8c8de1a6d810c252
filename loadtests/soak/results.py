"""What a scenario's run comes to (:class:`ScenarioResult`: sent, failed, killed in flight,
causes, latency, the gateway's memory, notes) and the report: a Markdown table, each
scenario's details, and the ``RESULT soak failed=<n> sent=<n>`` line."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtests.soak.load import Load
from loadtests.soak.stack import MIB


@dataclass
class ScenarioResult:
    number: int
    name: str
    action: str
    seconds: float = 0.0
    sent: int = 0
    ok: int = 0
    failed: int = 0  # normal clients' failures the goal does not allow
    killed_in_flight: int = 0  # in flight on a replica killed with SIGKILL (allowed)
    causes: Counter[str] = field(default_factory=Counter)
    failed_at: list[float] = field(default_factory=list)
    killed_causes: Counter[str] = field(default_factory=Counter)
    killed_by_timing: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    notes: list[str] = field(default_factory=list)
    error: str = ""

    def add_load(
        self, load: Load, killed_ids: set[str], kill_times: Sequence[float], t0: float
    ) -> None:
        """Count a load's outcomes. A failure is one in flight on a killed replica when
        that replica had logged reading it, or — for the moment between the replica's read
        and its log line — when it is a 502 saying the replica closed the connection
        before answering (a replica closes, rather than resets, only a request it had
        read) for a request that was under way at a kill and ended within 2 s of it."""
        self.sent += load.sent
        self.ok += load.ok
        self.versions.update(load.versions)
        self.latencies.extend(load.latencies)
        for rid, f in load.failures.items():
            by_log = rid in killed_ids
            by_time = not by_log and f.cause.startswith("HTTP 502 bad_gateway") and (
                "closed the connection before answering" in f.detail
            ) and any(f.began <= k <= f.ended <= k + 2 for k in kill_times)  # fmt: skip
            if by_log or by_time:
                self.killed_in_flight += 1
                self.killed_causes[f.cause] += 1
                self.killed_by_timing += by_time
            else:
                self.failed += 1
                self.causes[f.cause] += 1
                self.failed_at.append(f.ended - t0)

    def failure_span(self) -> str:
        """When the goal-breaking failures happened, seconds from the action's start."""
        if not self.failed_at:
            return ""
        return f"t={min(self.failed_at):.1f} s to t={max(self.failed_at):.1f} s"

    def percentile_ms(self, pct: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_start

    def row(self) -> list[str]:
        causes = ", ".join(f"{n}x {c}" for c, n in self.causes.most_common()) or "—"
        total = sum(self.versions.values())
        split = " ".join(f"v{v} {n / total:.0%}" for v, n in sorted(self.versions.items()))
        if self.error:
            causes = f"ERROR: {self.error.splitlines()[0][:120]}"
        killed = str(self.killed_in_flight)
        return [
            str(self.number), self.name, self.action, f"{self.seconds:.0f}", str(self.sent),
            str(self.failed), killed, causes, split or "—", f"{self.percentile_ms(50):.1f}",
            f"{self.percentile_ms(99):.1f}",
            f"{self.rss_start / MIB:.0f} → {self.rss_peak / MIB:.0f}",
        ]  # fmt: skip


HEADER = (
    "#", "scenario", "what was done", "s", "sent", "failed", "killed in flight",
    "failure causes", "answered by", "p50 ms", "p99 ms", "gateway RSS MB (start → peak)",
)  # fmt: skip


def markdown_table(rows: Sequence[Sequence[str]], header: Sequence[str] = HEADER) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report(results: Sequence[ScenarioResult]) -> str:
    out = [markdown_table([r.row() for r in results]), ""]
    for r in results:
        out.append(f"{r.number}. {r.name}: {r.action}")
        out.append(
            f"   sent {r.sent}, answered 200 {r.ok}, failed {r.failed}, in flight on killed "
            f"replicas {r.killed_in_flight}; gateway RSS {r.rss_start / MIB:.1f} MB at start, "
            f"peak {r.rss_peak / MIB:.1f} MB, {r.rss_end / MIB:.1f} MB at the end"
        )
        for cause, n in r.causes.most_common():
            out.append(f"   failed: {n}x {cause}")
        if r.failed_at:
            out.append(f"   failures from {r.failure_span()} (t=0: the action's start)")
        for cause, n in r.killed_causes.most_common():
            out.append(f"   in flight on a killed replica: {n}x {cause}")
        if r.killed_by_timing:
            out.append(
                f"   ({r.killed_by_timing} of those told by timing: a 502 'closed before "
                "answering' around a kill, not yet in the replica's log)"
            )
        for note in r.notes:
            out.append(f"   - {note}")
        if r.error:
            out.append(f"   ERROR: {r.error}")
    failed = sum(r.failed for r in results)
    sent = sum(r.sent for r in results)
    out += ["", f"RESULT soak failed={failed} sent={sent}"]
    return "\n".join(out)
