"""The HTTP front against nginx: the same raw requests through nginx ``proxy_pass`` and
through the gateway, each to the same recording replica (``loadtests/differential.py``).

What the replica receives and what the client gets back must agree, case for case,
apart from the differences that module documents (headers each proxy sets itself, the
framing of a forwarded body, error pages' bodies, and three places where the gateway is
deliberately stricter or follows the RFC where nginx doesn't).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from loadtests.differential import compare
from loadtests.harness.processes import managed_processes

CASES = 2000  # every kind 40 times


def test_the_gateway_and_nginx_agree_on_the_same_raw_requests(tmp_path: Path) -> None:
    with managed_processes() as procs:
        report = asyncio.run(compare(CASES, seed=19, procs=procs, workdir=tmp_path))
    assert report.total == CASES
    assert report.agreed == report.total, "\n".join(report.differences) + "\n" + report.table()
