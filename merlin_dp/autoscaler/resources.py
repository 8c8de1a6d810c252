"""CPU and memory of each replica, as utilization of the version's request.

Every tick the scaler hands :meth:`ReplicaResources.scrape` a version endpoint's
replicas; the ready ones are scraped at ``GET http://{address}/metrics`` concurrently,
with a short timeout, over one shared session. From the Prometheus text each replica
serves (the process collector every shipped model server has):

- memory: ``process_resident_memory_bytes`` / the version's ``memory_request`` x 100;
- CPU: the rate of ``process_cpu_seconds_total`` over the last ``window_s`` of samples
  (wall time from the injected ``now``) / the cores of ``cpu_request`` x 100. A rate
  needs two samples, so a replica's first scrape, and its first after a counter reset
  (the value went down, or the replica's pid or ``process_start_time_seconds``
  changed) or after a gap longer than ``max_gap_s``, has no CPU value yet.

The result, :class:`Utilization`, is the mean over the ready replicas that reported,
with how many did and why the others did not. Following the HPA: unready replicas are
set aside (not scraped, not expected), nothing is carried over from an earlier tick as
if it were current, and the caller can tell an incomplete answer from a complete one so
that it never scales down on missing data. A replica that misbehaves in any way (refused
connection, timeout, error status, malformed text, missing metric) is counted as missing
with a reason; ``scrape`` itself does not raise for anything a replica sends.

Quantities (``cpu_request``, ``memory_request``) are parsed by :func:`parse_cpu` and
:func:`parse_memory`, which accept what the controller's API accepts
(``merlin_dp.controller.models.ResourceRequest``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Literal

import aiohttp
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

from merlin_dp.common.aio import raise_if_cancelling
from merlin_dp.runtime import ReplicaInfo

log = logging.getLogger("autoscaler")

# Why a ready replica gave no value this tick, in the order they are checked. A replica is
# counted under one reason: the first that kept any of its values (CPU or memory) away.
MISSING_REASONS = (
    "unreachable",  # connection refused or reset, nothing listening
    "timeout",  # no complete answer within the scrape timeout
    "bad_status",  # an HTTP status other than 200
    "malformed",  # not Prometheus text, too large, or a value that is not a finite >= 0
    "no_metric",  # parsed, but process_cpu_seconds_total or process_resident_memory_bytes absent
    "no_request",  # the version's cpu_request or memory_request is zero or unparseable
    "first_sample",  # CPU needs two samples: first scrape, counter reset, or a long gap
)
MissingReason = Literal[
    "unreachable", "timeout", "bad_status", "malformed", "no_metric", "no_request",
    "first_sample",
]  # fmt: skip
Resource = Literal["cpu", "memory"]

CPU_SECONDS = "process_cpu_seconds_total"
RESIDENT_BYTES = "process_resident_memory_bytes"
START_TIME = "process_start_time_seconds"

MAX_BODY = 4 * 1024 * 1024  # a /metrics page larger than this is treated as malformed
MAX_SAMPLES = 128  # per replica; at very short intervals the CPU window shrinks instead


# --- quantities -------------------------------------------------------------------------

_CPU = re.compile(r"([0-9]+)m|([0-9]+(?:\.[0-9]+)?)")
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?")
_MEMORY_FACTOR = {
    None: 1,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}  # fmt: skip


def parse_cpu(quantity: str) -> float:
    """Cores in a Kubernetes CPU quantity: ``"500m"`` → 0.5, ``"2"`` → 2.0, ``"0.5"`` → 0.5.

    Raises :class:`ValueError` for anything else (the grammar of
    ``merlin_dp.controller.models.CPU``)."""
    m = _CPU.fullmatch(quantity)
    if m is None:
        raise ValueError(f"{quantity!r} is not a CPU quantity (like 500m, 2 or 0.5)")
    millis, cores = m.groups()
    return int(millis) / 1000 if millis is not None else float(Decimal(cores))


def parse_memory(quantity: str) -> int:
    """Bytes in a Kubernetes memory quantity: ``"512Mi"``, ``"1Gi"``, ``"1G"``, ``"1000"``.

    Binary (Ki Mi Gi Ti) and decimal (K M G T) suffixes; a fraction rounds up to whole
    bytes, as Kubernetes does. Raises :class:`ValueError` for anything else (the grammar
    of ``merlin_dp.controller.models.MEMORY``)."""
    m = _MEMORY.fullmatch(quantity)
    if m is None:
        raise ValueError(f"{quantity!r} is not a memory quantity (like 512Mi, 1Gi, 1G or 1000)")
    number, suffix = m.groups()
    exact = Decimal(number) * _MEMORY_FACTOR[suffix]
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


# --- the result ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Utilization:
    """One version endpoint's CPU and memory this tick, in percent of its request.

    ``cpu`` and ``memory`` are means over the ready replicas that reported that value
    (``None`` if none did); ``expected`` is the ready replica count. ``missing`` counts the
    ready replicas that did not report everything, by reason (every reason of
    :data:`MISSING_REASONS` is present, most are zero)."""

    cpu: float | None = None
    memory: float | None = None
    cpu_reported: int = 0
    memory_reported: int = 0
    expected: int = 0
    missing: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(MISSING_REASONS, 0))

    @property
    def reported(self) -> int:
        """Ready replicas that reported both values."""
        return self.expected - sum(self.missing.values())

    def value(self, resource: Resource) -> float | None:
        return self.cpu if resource == "cpu" else self.memory

    def complete(self, resource: Resource) -> bool:
        """Every ready replica reported ``resource`` (the HPA scales down only then)."""
        have = self.cpu_reported if resource == "cpu" else self.memory_reported
        return have == self.expected


# --- the collector ------------------------------------------------------------------------


@dataclass(slots=True)
class _Sample:
    at: float  # the injected clock
    cpu_seconds: float


@dataclass(slots=True)
class _Track:
    """What is remembered of one replica between ticks: enough to take a CPU rate."""

    address: str
    pid: int | None
    started: float | None  # process_start_time_seconds, if served
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


@dataclass(frozen=True, slots=True)
class Reading:
    """One replica's scrape: its process samples, or why there are none."""

    cpu_seconds: float | None = None
    resident: float | None = None
    started: float | None = None
    failure: MissingReason | None = None


class ReplicaResources:
    """Scrapes replicas' ``/metrics`` and keeps the last samples needed for CPU rates.

    State is per version key and replica id, and only for replicas the caller still
    lists: a replica missing from a scrape's list is forgotten, and :meth:`retain` drops
    version endpoints that are gone."""

    def __init__(
        self,
        timeout_s: float = 1.0,
        window_s: float = 15.0,
        max_gap_s: float = 60.0,
    ) -> None:
        self.timeout = timeout_s
        self.window = window_s
        self.max_gap = max_gap_s
        self._tracks: dict[str, dict[str, _Track]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def scrape(
        self,
        key: str,
        replicas: Sequence[ReplicaInfo],
        cpu_request: str,
        memory_request: str,
        now: float,
    ) -> Utilization:
        """Scrape the ready replicas of ``key`` and return their utilization."""
        tracks = self._tracks.setdefault(key, {})
        for gone in tracks.keys() - {r.id for r in replicas}:
            del tracks[gone]
        ready = [r for r in replicas if r.state == "ready"]
        if not ready:
            if not tracks:
                del self._tracks[key]
            return Utilization()
        readings = await asyncio.gather(
            *(self._read(r.metrics_address or r.address) for r in ready)
        )

        cores = _positive(parse_cpu, cpu_request)
        request_bytes = _positive(parse_memory, memory_request)
        missing = dict.fromkeys(MISSING_REASONS, 0)
        cpus: list[float] = []
        memories: list[float] = []
        for replica, reading in zip(ready, readings, strict=True):
            cpu_rate = self._cpu_rate(tracks, replica, reading, now)
            reason: MissingReason | None = reading.failure
            if reason is None and (reading.cpu_seconds is None or reading.resident is None):
                reason = "no_metric"
            if reading.resident is not None and request_bytes is not None:
                memories.append(reading.resident / request_bytes * 100)
            if cpu_rate is not None and cores is not None:
                cpus.append(cpu_rate / cores * 100)
            if reason is None and (cores is None or request_bytes is None):
                reason = "no_request"
            if reason is None and cpu_rate is None:
                reason = "first_sample"
            if reason is not None:
                missing[reason] += 1
        return Utilization(
            cpu=sum(cpus) / len(cpus) if cpus else None,
            memory=sum(memories) / len(memories) if memories else None,
            cpu_reported=len(cpus),
            memory_reported=len(memories),
            expected=len(ready),
            missing=missing,
        )

    def retain(self, keys: Iterable[str]) -> None:
        """Forget every version endpoint not in ``keys``."""
        keep = set(keys)
        for key in self._tracks.keys() - keep:
            del self._tracks[key]

    def tracked(self) -> dict[str, set[str]]:
        """Replica ids with remembered samples, per version key (for inspection)."""
        return {key: set(tracks) for key, tracks in self._tracks.items()}

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # -- internals

    def _cpu_rate(
        self, tracks: dict[str, _Track], replica: ReplicaInfo, reading: Reading, now: float
    ) -> float | None:
        """Add this reading's CPU sample to the replica's track; the rate in cores, if
        the track has a sample to take it from."""
        if reading.cpu_seconds is None:
            return None  # no sample this tick; the track keeps its last ones
        track = tracks.get(replica.id)
        if (
            track is None
            or track.address != replica.address
            or track.pid != replica.pid
            or (reading.started is not None and reading.started != track.started)
        ):
            # A new replica, or the same id now another process: start a new series.
            track = tracks[replica.id] = _Track(replica.address, replica.pid, reading.started)
        samples = track.samples
        if samples and (
            reading.cpu_seconds < samples[-1].cpu_seconds  # counter reset
            or now <= samples[-1].at  # the clock did not move forward
            or now - samples[-1].at > self.max_gap  # too long without a sample
        ):
            samples.clear()
        samples.append(_Sample(now, reading.cpu_seconds))
        # Keep one sample at or before the window's start: the rate spans the window.
        while len(samples) > 2 and now - samples[1].at >= self.window:
            samples.popleft()
        if len(samples) < 2:
            return None
        base = samples[0]
        return (reading.cpu_seconds - base.cpu_seconds) / (now - base.at)

    async def _read(self, address: str) -> Reading:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "text/plain;version=0.0.4"},
            )
        try:
            async with self._session.get(f"http://{address}/metrics") as resp:
                if resp.status != 200:
                    return Reading(failure="bad_status")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_BODY:
                        return Reading(failure="malformed")
                content_type = resp.headers.get("Content-Type", "")
        except TimeoutError:
            raise_if_cancelling()
            return Reading(failure="timeout")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise_if_cancelling()
            log.debug("replica %s gave no metrics: %s", address, exc)
            return Reading(failure="unreachable")
        return parse_metrics(bytes(body), content_type)


def parse_metrics(body: bytes, content_type: str = "") -> Reading:
    """The three process samples in a /metrics page (Prometheus text 0.0.4, or
    OpenMetrics when the content type says so). Never raises: unparseable text, or one
    of the samples with a value that is not finite and non-negative, is ``malformed``."""
    try:
        text = body.decode("utf-8")
        parser = (
            parse_openmetrics
            if content_type.startswith("application/openmetrics-text")
            else parse_prometheus
        )
        found: dict[str, float] = {}
        for family in parser(text):
            for sample in family.samples:
                if sample.name in (CPU_SECONDS, RESIDENT_BYTES, START_TIME) and (
                    sample.name not in found or not sample.labels
                ):
                    found[sample.name] = float(sample.value)
    except Exception:  # a third-party parser over untrusted input: any failure is bad text
        return Reading(failure="malformed")
    if any(not math.isfinite(v) or v < 0 for v in found.values()):
        return Reading(failure="malformed")
    return Reading(
        cpu_seconds=found.get(CPU_SECONDS),
        resident=found.get(RESIDENT_BYTES),
        started=found.get(START_TIME),
    )


def _positive(parse: Callable[[str], float], quantity: str) -> float | None:
    """A request's amount, or ``None`` if it can't divide: unparseable or zero (the
    controller validates requests, so this is a stored value from elsewhere)."""
    try:
        value = parse(quantity)
    except ValueError:
        log.debug("request %r cannot be parsed", quantity)
        return None
    return value if value > 0 else None
