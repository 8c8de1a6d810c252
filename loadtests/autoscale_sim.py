"""A deterministic autoscaling simulator: this project's policy against Knative's KPA, the
Kubernetes HPA and a clairvoyant oracle, on the same traces and the same random draws.

``python -m loadtests.bench autoscale`` runs it and prints the table (see
:mod:`loadtests.bench.autoscale`). Nothing here reads a clock: simulated time is the only
time.

The model
---------

- **Arrivals**: a non-homogeneous Poisson process with rate λ(t) from a :class:`Trace`,
  drawn by thinning against the trace's peak rate.
- **Service time**: log-normal, mean 50 ms, sigma = 0.5 of the underlying normal (CV ≈ 0.53):
  right-skewed with no near-zero mass, the usual shape of a model server's latency. A
  request's service time does not depend on the replica or on how busy it is (a replica
  with concurrency limit c runs c requests side by side, like c model workers).
- **Replicas**: each has ``limit`` slots (the per-replica concurrency limit: 1 or 4). A
  replica is requested at a decision and becomes ready ``startup`` seconds later (5 s or
  30 s). It costs from the moment it is requested until it has left: a replica taken
  away while starting leaves at once; a ready one is marked draining, takes no new
  request and leaves when its in-flight requests finish. Scale-down removes starting
  replicas first (newest first), then the most recently ready ones — the ReplicaSet's
  order. At most :data:`CLUSTER_CAP` replicas can exist at once (the cluster's size).
- **Router**: one shared FIFO queue in front of all ready slots (the gateway holds a
  request until a slot is free; at zero ready replicas it holds them all — activation).
  Latency = wait in the queue + service. An SLO miss is a wait over 100 ms.
- **Signals**: the router is the simulated gateway. Every whole second it emits the
  record a real gateway emits (:func:`gateway_record`, ``merlin_dp/spec/signals.py``),
  from its own events only: arrivals, requests queued at the router and on a replica
  (exact time integrals), completions and their dispatch-to-answer times — never the
  trace or the service-time distribution. Controllers also see ready/starting/draining
  counts and what is held at zero. This project's policy (:class:`ProjectPolicy`) is
  production's :class:`~merlin_dp.autoscaler.inputs.VersionAutoscaler` fed those records,
  the replica counts and the start-up time a runtime measures; the baselines read the
  series their real counterparts read (:class:`View`).

Time
----

Discrete events inside fixed one-second steps. Decisions happen on whole seconds (the
project's scaler ticks every second, KPA every 2 s, HPA every 15 s; a version at zero
with waiting requests is decided at the next whole second, which models the activation
poke, which said one request waits). Start-up times are whole seconds, so capacity only
changes on whole seconds; in between, the FIFO queue is served exactly: each request
takes the earliest free slot, ``start = max(arrival, free)``, and a request whose start
would fall after the next second boundary stays queued for that boundary (where
capacity may change). This is
exact for the model (no time-step error in latencies) and costs one heap operation per
request: the whole benchmark (432 runs) takes about 12 s on 2 cores.

Traces (:data:`TRACES`; 600 s unless said): steady 100 rps; step 5 -> 200 rps at 120 s;
spike 20 rps with 10x (200 rps) during [120 s, 150 s); diurnal, a sine from 20 up to 200
rps and back over the 10 minutes; on/off, 30 s bursts of 100 rps every 150 s from 60 s,
zero in between (long enough for every policy to reach zero); periodic (1200 s), a batch
caller's 150 rps for 20 s every 180 s from 60 s over 5 rps.

Policies (:data:`loadtests.bench.autoscale.POLICIES`): ``ours`` is production's
``VersionAutoscaler`` with the ``PolicyConfig`` production builds (:func:`project_config`:
the concurrency metric with target = the replica's limit, min 0, max 100, every timing
at its default), fed each second as above (:class:`ProjectPolicy`); the baselines are in
:mod:`loadtests.autoscale_baselines`. What the benchmark reports per trace, start-up time
and limit is in :mod:`loadtests.bench.autoscale`; miss shares there compare with a floor of
0.1% (:data:`SLO_FLOOR`).

Runs begin after a simulated warm-up: :data:`WARMUP_S` seconds of the trace's first rate
served by the oracle's replica count for it, whose records are the history every
controller starts with (requests of the warm-up are not counted). Cost (replica-seconds) is
counted over the trace; after its end the simulation continues (no arrivals) only until
every request has been served, so late requests' latencies are counted too.

Determinism: one ``random.Random`` per (trace, seed) draws the arrivals and service
times, shared by every policy (common random numbers: policies see the same requests).
Nothing else is random, so the same seed gives the same numbers, in one process or many.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

from merlin_dp.autoscaler.inputs import Replicas, VersionAutoscaler
from merlin_dp.autoscaler.policy import PolicyConfig, PolicyState
from merlin_dp.spec.signals import SignalRecord

SERVICE_MEAN_S = 0.05
SERVICE_SIGMA = 0.5
SLO_WAIT_S = 0.1
TARGET_UTILIZATION = 0.7  # the oracle's and every baseline's target
STARTUPS = (5, 30)
LIMITS = (1, 4)
SEEDS = (1, 2, 3)
CLUSTER_CAP = 2000
HISTORY_S = 300  # signal history kept before t = 0 (the longest window any policy reads)
WARMUP_S = 120  # simulated before t = 0 at λ(0) with the oracle's replicas: the history
SLO_FLOOR = 0.001  # miss shares below 0.1% compare as 0.1%
MAX_TAIL_S = 900  # after the trace: time allowed for the backlog to drain


# --- traces ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    """λ(t) in requests per second over ``[0, duration)``.

    ``kind`` selects the shape: ``steady`` (``base``), ``step`` (``base`` then ``high``
    from ``at``), ``spike`` (``base``, ``high`` during ``[at, at + width)``), ``diurnal``
    (a sine from ``base`` up to ``high`` and back over ``period``), ``onoff`` (``high``
    during ``[at + k·period, at + k·period + width)``, else zero), ``periodic`` (the same
    bursts over ``base``: a batch caller every ``period`` on top of other traffic).
    """

    name: str
    kind: str
    duration: int
    base: float
    high: float = 0.0
    at: float = 0.0
    width: float = 0.0
    period: float = 0.0

    def rate(self, t: float) -> float:
        if t < 0:
            t = 0.0
        if self.kind == "steady":
            return self.base
        if self.kind == "step":
            return self.high if t >= self.at else self.base
        if self.kind == "spike":
            return self.high if self.at <= t < self.at + self.width else self.base
        if self.kind == "diurnal":
            mid, amp = (self.base + self.high) / 2, (self.high - self.base) / 2
            return mid - amp * math.cos(2 * math.pi * t / self.period)
        if self.kind in ("onoff", "periodic"):
            phase = t - self.at
            between = 0.0 if self.kind == "onoff" else self.base
            return self.high if phase >= 0 and phase % self.period < self.width else between
        raise ValueError(f"unknown trace kind {self.kind!r}")

    @property
    def peak(self) -> float:
        return max(self.base, self.high)

    @property
    def steps(self) -> tuple[float, ...]:
        """Instants where the rate steps up (time to capacity is measured from these)."""
        if self.kind in ("step", "spike"):
            return (self.at,)
        if self.kind in ("onoff", "periodic"):
            return tuple(self.at + k * self.period for k in range(self.cycles))
        return ()

    @property
    def learned_at(self) -> float:
        """When the trace's pattern has been seen twice (periodic: the second burst is
        over), so a forecast could know it; 0 for traces with nothing to learn."""
        if self.kind == "periodic":
            return self.at + self.period + self.width
        return 0.0

    @property
    def cycles(self) -> int:
        return max(0, math.ceil((self.duration - self.at) / self.period)) if self.period else 0


TRACES: tuple[Trace, ...] = (
    Trace("steady", "steady", 600, base=100.0),
    Trace("step", "step", 600, base=5.0, high=200.0, at=120.0),
    Trace("spike", "spike", 600, base=20.0, high=200.0, at=120.0, width=30.0),
    Trace("diurnal", "diurnal", 600, base=20.0, high=200.0, period=600.0),
    Trace("onoff", "onoff", 600, base=0.0, high=100.0, at=60.0, width=30.0, period=150.0),
    Trace("periodic", "periodic", 1200, base=5.0, high=150.0, at=60.0, width=20.0, period=180.0),
)
# Where a policy has what it needs to meet the oracle closely: load that holds still, moves
# slowly, steps with a short start-up, or repeats (cost compared once it has repeated).
PREDICTABLE = {"steady": (5, 30), "diurnal": (5, 30), "step": (5,), "periodic": (5, 30)}


def needed_replicas(rate: float, limit: int) -> int:
    """Replicas for ``rate`` at the target utilization (the oracle's sizing)."""
    return math.ceil(round(rate * SERVICE_MEAN_S / (limit * TARGET_UTILIZATION), 9))


def needed_peak(trace: Trace, limit: int) -> int:
    return needed_replicas(trace.peak, limit)


# --- workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One seed's requests for one trace: arrival times (sorted) and service times."""

    arrivals: list[float]
    service: list[float]
    # count_before[s + WARMUP_S] / sum_before[...]: number and sum of arrival times before
    # second s (arrivals begin at -WARMUP_S, the warm-up).
    count_before: list[int]
    sum_before: list[float]


def make_workload(trace: Trace, seed: int) -> Workload:
    rng = random.Random(f"{trace.name}/{seed}")
    peak = trace.peak
    mu = math.log(SERVICE_MEAN_S) - SERVICE_SIGMA**2 / 2
    arrivals: list[float] = []
    t = -float(WARMUP_S)
    while True:
        t += rng.expovariate(peak)
        if t >= trace.duration:
            break
        if rng.random() * peak < trace.rate(t):
            arrivals.append(t)
    service = [rng.lognormvariate(mu, SERVICE_SIGMA) for _ in arrivals]
    horizon = trace.duration + MAX_TAIL_S + 2
    count_before = [0] * (horizon + WARMUP_S + 1)
    sum_before = [0.0] * (horizon + WARMUP_S + 1)
    i, total, n = 0, 0.0, len(arrivals)
    for s in range(-WARMUP_S, horizon + 1):
        while i < n and arrivals[i] < s:
            total += arrivals[i]
            i += 1
        count_before[s + WARMUP_S], sum_before[s + WARMUP_S] = i, total
    return Workload(arrivals, service, count_before, sum_before)


# --- what a controller sees ---------------------------------------------------------------


@dataclass
class View:
    """The cluster as a controller sees it at ``now`` (a whole second).

    Per-second series are indexed by ``second + HISTORY_S``; only seconds before ``now``
    are complete. ``concurrency`` is the time-weighted mean of requests in the system
    (queued at the router or on a replica), ``busy`` of requests on a replica, ``slots``
    the ready slots; ``served``/``served_time`` count requests that finished in the second
    and their total service time. ``written`` marks seconds in which Knative would have
    recorded a sample (a replica was ready, or the activator held requests).
    """

    trace: Trace
    startup: int
    limit: int
    now: int = 0
    ready: int = 0
    starting: int = 0
    draining: int = 0
    queued: int = 0  # at the router, not yet on a replica
    arrivals: list[float] = field(default_factory=list)
    concurrency: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)
    slots: list[float] = field(default_factory=list)
    served: list[float] = field(default_factory=list)
    served_time: list[float] = field(default_factory=list)
    written: list[bool] = field(default_factory=list)

    @property
    def live(self) -> int:
        return self.ready + self.starting


class Controller(Protocol):
    """An autoscaler under test: ``decide`` is called every simulated second and returns
    the replica count it wants now, or ``None`` to leave things as they are."""

    def decide(self, view: View) -> int | None: ...


ControllerFactory = Callable[[View], Controller]


# --- this project's policy ----------------------------------------------------------------


def project_config(metrics_type: str, limit: int) -> PolicyConfig:
    """The policy exactly as production builds it (``merlin_dp.autoscaler.scaler.policy_config``)
    for a version endpoint scaling on ``metrics_type`` with target = the concurrency limit
    (or, for rps, what one replica serves at full load), min 0, max 100 (the API's max)."""
    from merlin_dp.autoscaler.scaler import ScaledVersion, policy_config
    from merlin_dp.spec.endpoints import AutoscalingPolicy, ResourceRequest

    target = float(limit) if metrics_type == "concurrency" else limit / SERVICE_MEAN_S
    policy = AutoscalingPolicy.model_validate(
        {"metrics_type": metrics_type, "target_value": target}
    )
    resources = ResourceRequest(min_replica=0, max_replica=100)
    return policy_config(ScaledVersion("sim", "model", "1", policy, resources))


def gateway_record(view: View, second: int) -> SignalRecord:
    """The simulated gateway's record of ``second``: what a real gateway counts and
    samples (:mod:`merlin_dp.gateway.signals`), from the simulator's own events — arrivals,
    requests waiting in its queue and on replicas (exact time integrals), completions and
    their dispatch-to-answer times. Never the trace or the service-time distribution."""
    i = second + HISTORY_S
    concurrency = view.concurrency[i]
    in_service = view.busy[i]
    return {
        "project": "sim", "model": "model", "version": "1", "second": second,
        "requests": int(view.arrivals[i]), "concurrency": concurrency,
        "in_service": in_service, "queued": max(0.0, concurrency - in_service),
        "completions": int(view.served[i]), "service_seconds": view.served_time[i],
    }  # fmt: skip


class ProjectPolicy:
    """This project's autoscaler as production runs it: a
    :class:`~merlin_dp.autoscaler.inputs.VersionAutoscaler` fed, every second, the
    simulated gateway's records (:func:`gateway_record`) and the runtime's replica counts
    and measured start-up time — the one signal path production uses."""

    def __init__(self, view: View, metrics_type: str = "concurrency") -> None:
        config = project_config(metrics_type, view.limit)
        state = PolicyState(desired=view.live, last_active=None if view.live == 0 else 0.0)
        self.scaler = VersionAutoscaler(config, state)
        self.added = -WARMUP_S  # records before this second are in
        self._observe(view)

    def _observe(self, view: View) -> None:
        records = [gateway_record(view, s) for s in range(self.added, view.now)]
        self.scaler.observe(records, float(view.now))
        self.added = view.now

    def decide(self, view: View) -> int | None:
        self._observe(view)
        # The runtime measured the start-up of the replicas running at t = 0.
        replicas = Replicas(view.ready, view.starting, view.draining, float(view.startup))
        # At zero, the gateway pokes when the first request arrives, holding that one, and
        # production decides on the poke at once; the simulator decides on whole seconds,
        # by when more have arrived, but the poke it models said one.
        waiting = min(view.queued, 1) if view.live == 0 else 0
        return self.scaler.decide(replicas, float(view.now), waiting=waiting).desired


# --- the simulation ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    cost: float  # replica-seconds over the trace
    cost_learned: float  # replica-seconds from ``trace.learned_at`` on
    requests: int
    misses: int  # waited over the SLO
    p99: float  # seconds
    time_to_capacity: float | None  # mean over the trace's steps
    direction_changes: int
    peak: int


def initial_replicas(trace: Trace, limit: int) -> int:
    return needed_replicas(trace.rate(0.0), limit)


def simulate(
    trace: Trace, work: Workload, factory: ControllerFactory, startup: int, limit: int
) -> RunResult:
    arr, svc = work.arrivals, work.service
    n = len(arr)
    w0 = WARMUP_S
    duration = trace.duration
    end = duration + MAX_TAIL_S
    size = HISTORY_S + end + 2
    view = View(trace, startup, limit)
    view.arrivals = [0.0] * size
    view.concurrency = [0.0] * size
    view.busy = [0.0] * size
    view.slots = [0.0] * size
    view.served = [0.0] * size
    view.served_time = [0.0] * size
    view.written = [False] * size
    # Per second s, at index s + w0: requests finishing (and their finish times, and
    # service times), requests starting service (and their start times).
    dep_cnt = [0] * (end + w0 + 2)
    dep_sum = [0.0] * (end + w0 + 2)
    start_cnt = [0] * (end + w0 + 2)
    start_sum = [0.0] * (end + w0 + 2)
    svc_sum = [0.0] * (end + w0 + 2)
    last_index = end + w0 + 1
    count_before, sum_before = work.count_before, work.sum_before

    # Replicas: parallel lists indexed by replica id.
    requested: list[float] = []
    left: list[float] = []  # inf while alive
    busy_until: list[float] = []
    gone: list[bool] = []  # draining or left: takes no new request
    starting: deque[tuple[int, int]] = deque()  # (ready_at, id), in request order
    ready: list[int] = []  # ready ids, oldest first
    draining_leave: list[float] = []
    heap: list[tuple[float, int]] = []  # (slot free at, replica id)

    def add_replica(at: float, ready_at: int) -> None:
        rid = len(requested)
        requested.append(at)
        left.append(math.inf)
        busy_until.append(at)
        gone.append(False)
        if ready_at <= at:
            ready.append(rid)
            for _ in range(limit):
                heapq.heappush(heap, (at, rid))
        else:
            starting.append((ready_at, rid))

    # The warm-up: the oracle's replicas for λ(0), ready before it begins, serve the
    # warm-up's requests; its seconds are the history every controller starts with.
    n0 = initial_replicas(trace, limit)
    for _ in range(n0):
        add_replica(-float(w0), -w0)
    for rid in range(n0):
        requested[rid] = -float(w0 + startup)

    controller: Controller | None = None
    wait = [math.inf] * n
    nxt = 0  # FIFO: requests start in arrival order; nxt is the first not yet started
    integral_prev = 0.0
    busy_prev = 0.0
    cum_dep_cnt, cum_dep_sum, cum_start_cnt, cum_start_sum = 0, 0.0, 0, 0.0
    ready_at_tick: list[int] = []
    targets: list[int] = [n0]

    t = -w0
    while t < end:
        if t > -w0:
            # Close second t-1: integrals of requests in system and on replicas.
            s = t - 1
            k = s + w0
            cum_dep_cnt += dep_cnt[k]
            cum_dep_sum += dep_sum[k]
            cum_start_cnt += start_cnt[k]
            cum_start_sum += start_sum[k]
            a_cnt, a_sum = count_before[t + w0], sum_before[t + w0]
            integral = cum_dep_sum + (a_cnt - cum_dep_cnt) * t - a_sum
            busy_int = cum_dep_sum + (cum_start_cnt - cum_dep_cnt) * t - cum_start_sum
            i = s + HISTORY_S
            view.arrivals[i] = a_cnt - count_before[k]
            view.concurrency[i] = integral - integral_prev
            view.busy[i] = busy_int - busy_prev
            view.served[i] = dep_cnt[k]
            view.served_time[i] = svc_sum[k]
            view.written[i] = view.written[i] or view.concurrency[i] > 0
            integral_prev, busy_prev = integral, busy_int
        # Replicas whose start-up is over become ready.
        while starting and starting[0][0] <= t:
            _, rid = starting.popleft()
            ready.append(rid)
            busy_until[rid] = t
            for _ in range(limit):
                heapq.heappush(heap, (float(t), rid))
        if draining_leave:
            draining_leave = [x for x in draining_leave if x > t]
        view.now = t
        view.ready = len(ready)
        view.starting = len(starting)
        view.draining = len(draining_leave)
        view.queued = count_before[t + w0] - nxt
        i = t + HISTORY_S
        view.slots[i] = len(ready) * limit
        view.written[i] = len(ready) > 0

        if t >= duration and nxt >= n:
            break
        if t >= 0:
            if controller is None:
                controller = factory(view)
            desired = controller.decide(view)
            if desired is not None:
                desired = max(0, min(CLUSTER_CAP, desired))
                live = len(ready) + len(starting)
                if desired > live:
                    for _ in range(desired - live):
                        add_replica(float(t), t + startup)
                elif desired < live:
                    drop = live - desired
                    while drop and starting:
                        _, rid = starting.pop()
                        left[rid] = t
                        gone[rid] = True
                        drop -= 1
                    while drop and ready:
                        rid = ready.pop()
                        gone[rid] = True
                        leave = max(float(t), busy_until[rid])
                        left[rid] = leave
                        if leave > t:
                            draining_leave.append(leave)
                        drop -= 1
                    if len(heap) > 4 * limit * (len(ready) + 1):
                        heap = [e for e in heap if not gone[e[1]]]
                        heapq.heapify(heap)
                if desired != targets[-1]:
                    targets.append(desired)
            ready_at_tick.append(len(ready))

        # Serve the queue until the next second boundary.
        boundary = t + 1.0
        while nxt < n:
            a = arr[nxt]
            if a >= boundary:
                break
            while heap and gone[heap[0][1]]:
                heapq.heappop(heap)
            if not heap:
                break
            free, rid = heap[0]
            st = a if a > free else free
            if st >= boundary:
                break
            done = st + svc[nxt]
            heapq.heapreplace(heap, (done, rid))
            if done > busy_until[rid]:
                busy_until[rid] = done
            wait[nxt] = st - a
            ss = int(st + w0)
            start_cnt[ss] += 1
            start_sum[ss] += st
            ds = int(done + w0)
            if ds > last_index:
                ds = last_index
            dep_cnt[ds] += 1
            dep_sum[ds] += done
            svc_sum[ds] += svc[nxt]
            nxt += 1
        t += 1

    cost = cost_learned = 0.0
    learned = trace.learned_at
    for rid in range(len(requested)):
        lo = max(requested[rid], 0.0)
        hi = min(left[rid], float(duration))
        if hi > lo:
            cost += hi - lo
        lo = max(lo, learned)
        if hi > lo:
            cost_learned += hi - lo
    first = count_before[w0]  # requests of the trace proper, not the warm-up's
    counted = n - first
    misses = sum(1 for w in wait[first:] if w > SLO_WAIT_S)
    latencies = sorted(w + s for w, s in zip(wait[first:], svc[first:], strict=True))
    p99 = latencies[min(counted - 1, int(0.99 * counted))] if counted else 0.0
    return RunResult(
        cost=cost,
        cost_learned=cost_learned,
        requests=counted,
        misses=misses,
        p99=p99,
        time_to_capacity=_time_to_capacity(trace, ready_at_tick, limit),
        direction_changes=direction_changes(targets),
        peak=max(targets),
    )


def _time_to_capacity(trace: Trace, ready_at_tick: list[int], limit: int) -> float | None:
    """Mean over the trace's step-ups of the time until the ready replicas could serve the
    new rate (ready x limit / mean service time >= λ just after the step)."""
    per_replica = limit / SERVICE_MEAN_S
    times = []
    for step in trace.steps:
        if step >= trace.duration:
            continue
        need = trace.rate(step + 0.5)
        first = math.ceil(step)
        found = next(
            (t for t in range(first, len(ready_at_tick)) if ready_at_tick[t] * per_replica >= need),
            None,
        )
        times.append(math.inf if found is None else found - step)
    return sum(times) / len(times) if times else None


def direction_changes(targets: Sequence[int]) -> int:
    """How often the asked-for replica count turned from rising to falling or back."""
    changes, last = 0, 0
    for a, b in pairwise(targets):
        sign = (b > a) - (b < a)
        if sign and last and sign != last:
            changes += 1
        if sign:
            last = sign
    return changes
