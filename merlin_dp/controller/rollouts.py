"""Running rollouts beside a controller: count, decide, route, once a second.

:class:`RolloutDriver` keeps a working copy of each running rollout's status. Every tick
it counts the seconds the gateways have reported since (their per-second records, read
from the autoscaler's signal source: the same numbers the autoscaler scales on), asks
:func:`merlin_dp.rollout.engine.decide`, and carries a move out through
:meth:`Controller.change` (:func:`merlin_dp.controller.state.rollout_moved`): the new rule
and the status in one revision, in the history and the audit log. The status is saved
with each decision, so a restarted controller resumes at the same phase and step with the
evidence of the steps before; what the current step had counted since its last decision
is counted again from the gateways' records that are still there. Before a canary step
or a promotion the plan's webhook is called; a refusal pauses the rollout.

Only a ready controller drives (in Kubernetes mode: the leader).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from merlin_dp.autoscaler.collector import SignalSource
from merlin_dp.common.aio import cancel_and_wait
from merlin_dp.controller import state as st
from merlin_dp.controller.models import ControllerState
from merlin_dp.controller.service import Controller
from merlin_dp.controller.store import StoreError
from merlin_dp.rollout import engine
from merlin_dp.rollout.evidence import count_second, last_countable
from merlin_dp.spec.rollout import Phase, RolloutStatus

log = logging.getLogger("controller.rollouts")

WEBHOOK_TIMEOUT_S = 10.0
PHASES: tuple[Phase, ...] = ("shadow", "canary", "promoted", "rolled_back", "aborted")
RESULTS = {"step": "step", "promote": "promoted", "rollback": "rolled_back", "pause": "paused",
           "resume": "resumed", "abort": "aborted", "start": "started"}  # fmt: skip


class RolloutDriver:
    def __init__(
        self,
        controller: Controller,
        signals: SignalSource | None,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        poll: bool = False,
    ) -> None:
        self.c = controller
        self.signals = signals
        # The autoscaler polls the signal source each second; without one, the driver does.
        self.poll = poll
        self.interval = interval
        self.clock = clock
        self.working: dict[str, RolloutStatus] = {}
        self.decisions: dict[str, int] = {}  # result -> count
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._session is not None:
            await self._session.close()

    def status(self, key: str) -> RolloutStatus | None:
        """The rollout as it stands: the working copy (with the evidence counted since the
        last decision) while it runs, else what the state holds."""
        stored = self.c.state.rollouts.get(key)
        mine = self.working.get(key)
        if stored is None or mine is None or mine.started != stored.started:
            return stored
        if len(mine.decisions) != len(stored.decisions):
            return stored
        return mine

    def count(self, result: str) -> None:
        self.decisions[result] = self.decisions.get(result, 0) + 1

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout tick failed")
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        if not self.c.ready()[0]:
            return
        now = self.clock()
        if self.poll and self.signals is not None:
            await self.signals.poll(now)
        for key, stored in list(self.c.state.rollouts.items()):
            if not stored.active:
                self.working.pop(key, None)
                continue
            status = self._working_copy(key, stored)
            self._count(status, now)
            move = self._candidate_failed(status) or engine.decide(status, now)
            if move is not None:
                await self._carry_out(key, status, move, now)

    def _working_copy(self, key: str, stored: RolloutStatus) -> RolloutStatus:
        mine = self.working.get(key)
        if mine is not None and mine.started == stored.started \
                and len(mine.decisions) == len(stored.decisions):  # fmt: skip
            return mine
        fresh = stored.model_copy(deep=True)
        if mine is not None and mine.started == stored.started and mine.phase == fresh.phase \
                and mine.step == fresh.step:  # fmt: skip
            # Paused or resumed by the API: the evidence counted meanwhile still holds.
            fresh.shadow, fresh.live = mine.shadow, mine.live
            fresh.counted_to = mine.counted_to
        self.working[key] = fresh
        return fresh

    def _count(self, status: RolloutStatus, now: float) -> None:
        signals = self.signals
        if signals is None:
            return
        base = (status.project, status.model, status.baseline)
        cand = (status.project, status.model, status.candidate)
        last = last_countable(now)
        # The signal source keeps a few minutes: older seconds are gone.
        first = max(status.counted_to + 1, status.count_from, last - signals.horizon + 1)
        for second in range(first, last + 1):
            count_second(status, second, signals.second(base, second),
                         signals.second(cand, second))  # fmt: skip

    def _candidate_failed(self, status: RolloutStatus) -> engine.Move | None:
        rec = self.c.state.versions.get(st.version_key(status.project, status.model,
                                                       status.candidate))  # fmt: skip
        if rec is not None and rec.status == "failed":
            first = rec.message.splitlines()[0] if rec.message else "no reason given"
            return engine.Move("rollback", 0, f"version {status.candidate} failed: {first}")
        return None

    async def _carry_out(
        self, key: str, status: RolloutStatus, move: engine.Move, now: float
    ) -> None:
        moved = status.model_copy(deep=True)
        if move.action in ("step", "promote") and status.plan.webhook is not None:
            refused = await self._webhook(status, move)
            if refused:
                engine.pause(moved, refused, now)
                await self._save(key, status, moved, now, "pause")
                return
        engine.carry_out(moved, move, now, 0)
        await self._save(key, status, moved, now, move.action)

    async def _save(
        self, key: str, before: RolloutStatus, moved: RolloutStatus, now: float, action: str
    ) -> None:
        count = len(before.decisions)

        def transition(state: ControllerState) -> ControllerState:
            return st.rollout_moved(state, key, moved, decisions_before=count, now=now)

        reason = moved.decisions[-1].reason if moved.decisions else ""
        audit = {"who": "rollout", "action": f"rollout_{action}", "target": key,
                 "reason": reason}  # fmt: skip
        try:
            new = await self.c.change(transition, audit)
        except (st.ApiError, StoreError) as exc:
            log.warning("rollout of %s: %s not saved (tried again next tick): %s", key,
                        action, exc)  # fmt: skip
            self.working.pop(key, None)
            return
        log.info("rollout of %s: %s (%s)", key, action, reason)
        self.count(RESULTS.get(action, action))
        self.working[key] = new.rollouts[key].model_copy(deep=True)

    async def _webhook(self, status: RolloutStatus, move: engine.Move) -> str | None:
        """None when the webhook agrees (2xx); else why it did not."""
        url = str(status.plan.webhook)
        body = {"project": status.project, "model": status.model,
                "baseline": status.baseline, "candidate": status.candidate,
                "phase": status.phase, "action": move.action, "weight": move.weight}  # fmt: skip
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
            )
        try:
            async with self._session.post(url, json=body) as resp:
                text = (await resp.text())[:200]
                if 200 <= resp.status < 300:
                    return None
                return f"webhook {url} answered {resp.status} before {move.action} to " \
                       f"{move.weight}%: {text}"  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"webhook {url} failed before {move.action} to {move.weight}%: " \
                   f"{exc!r}"  # fmt: skip

    def render(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry).decode("utf-8")


def attach_rollouts(
    controller: Controller, signals: SignalSource, *, poll: bool = False
) -> RolloutDriver:
    """Run rollouts beside a controller on the gateways' signals (``poll``: no autoscaler
    reads the source already): the API's rollout routes, and ``/metrics``."""
    driver = RolloutDriver(controller, signals, poll=poll)
    controller.rollouts = driver
    controller.metrics.append(driver.render)
    driver.start()
    return driver


class _Collector(Collector):
    def __init__(self, driver: RolloutDriver) -> None:
        self.driver = driver

    def collect(self) -> Iterator[Metric]:
        labels = ["project", "model", "candidate"]
        phase = GaugeMetricFamily("merlin_rollout_phase",
                                  "1 for the phase each model endpoint's rollout is in",
                                  labels=[*labels, "phase"])  # fmt: skip
        weight = GaugeMetricFamily("merlin_rollout_step_weight",
                                   "The candidate's share of callers, percent",
                                   labels=labels)  # fmt: skip
        value = GaugeMetricFamily("merlin_rollout_analysis_value",
                                  "What the analysis counted, per version: error rate, share "
                                  "of answers above the latency bound, mismatch rate",
                                  labels=["project", "model", "version", "metric"])  # fmt: skip
        ratio = GaugeMetricFamily("merlin_rollout_log_likelihood_ratio",
                                  "Each test's log-likelihood ratio (fails at fail_at)",
                                  labels=["project", "model", "metric"])  # fmt: skip
        for key in list(self.driver.c.state.rollouts):
            status = self.driver.status(key)
            if status is None:
                continue
            names = [status.project, status.model, status.candidate]
            for p in PHASES:
                phase.add_metric([*names, p], 1.0 if status.phase == p else 0.0)
            weight.add_metric(names, float(status.weight))
            for t in status.tests:
                where = [status.project, status.model]
                value.add_metric([*where, status.baseline, t.metric], t.baseline)
                value.add_metric([*where, status.candidate, t.metric], t.candidate)
                ratio.add_metric([*where, t.metric], t.llr)
        decisions = CounterMetricFamily(
            "merlin_rollout_decisions", "Rollout decisions by result", labels=["result"]
        )
        for result, n in sorted(self.driver.decisions.items()):
            decisions.add_metric([result], float(n))
        yield from (phase, weight, value, ratio, decisions)
