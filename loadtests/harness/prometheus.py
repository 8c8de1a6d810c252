"""Prometheus text: parsing an exposition into samples, picking one metric's samples, and
reading a process's ``/metrics``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from loadtests.harness.errors import HarnessError
from loadtests.harness.ports import http_get
from merlin_dp.common.net import LOOPBACK


@dataclass(frozen=True)
class MetricSample:
    """One sample line of the Prometheus text format."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_LABEL_UNESCAPES: Mapping[str, str] = MappingProxyType({"\\\\": "\\", '\\"': '"', "\\n": "\n"})


def parse_prometheus_text(text: str) -> list[MetricSample]:
    """The samples of a Prometheus text exposition (comments and blank lines skipped)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            continue
        labels = {
            k: re.sub(r"\\[\\\"n]", lambda m: _LABEL_UNESCAPES[m.group(0)], v)
            for k, v in _LABEL_RE.findall(match.group(2) or "")
        }
        samples.append(MetricSample(match.group(1), labels, float(match.group(3))))
    return samples


def samples_named(text: str, name: str) -> list[MetricSample]:
    """The samples of metric `name` in Prometheus `text`, in the order they appear."""
    return [s for s in parse_prometheus_text(text) if s.name == name]


def label_text(labels: Mapping[str, str]) -> str:
    """Labels as the exposition writes them between the braces: ``a="x",b="y"``."""
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def read_metrics(admin_port: int) -> list[MetricSample]:
    """GET /metrics from an admin port on 127.0.0.1, parsed."""
    try:
        status, body = http_get(LOOPBACK, admin_port, "/metrics")
    except OSError as exc:
        raise HarnessError(f"GET /metrics on admin port {admin_port} failed: {exc}") from exc
    if status != 200:
        raise HarnessError(f"GET /metrics on admin port {admin_port} answered {status}")
    return parse_prometheus_text(body.decode(errors="replace"))
