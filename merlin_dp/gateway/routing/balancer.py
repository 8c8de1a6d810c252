"""Replica choice: power of two choices on outstanding requests, ejection aware.

The common case (no retry, nobody ejected) draws two distinct replicas and keeps the
less loaded: two random numbers and two comparisons, no allocation. Retries and
ejections take a linear scan over the (small) replica tuple. If every untried replica
is ejected we use them anyway (Envoy's panic threshold, at 100%): an ejected replica
is a better bet than a certain 503.

A version with a concurrency limit chooses only among replicas with a free slot
(:func:`choose_free`); none free means the request waits in the version's queue.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from merlin_dp.gateway.pool.upstream import Upstream


def choose(
    upstreams: Sequence[Upstream],
    tried: list[Upstream] | None = None,
    rand: Callable[[], float] = random.random,
) -> Upstream | None:
    n = len(upstreams)
    if n == 1:
        only = upstreams[0]
        return None if tried and only in tried else only
    if n == 0:
        return None
    if tried is None:
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a = upstreams[i]
        b = upstreams[j]
        if not a.ejected and not b.ejected:
            return a if a.outstanding <= b.outstanding else b
    return _least_outstanding(upstreams, tried, skip_ejected=True) or _least_outstanding(
        upstreams, tried, skip_ejected=False
    )


def _least_outstanding(
    upstreams: Sequence[Upstream], tried: list[Upstream] | None, skip_ejected: bool
) -> Upstream | None:
    best: Upstream | None = None
    for u in upstreams:
        if (skip_ejected and u.ejected) or (tried and u in tried):
            continue
        if best is None or u.outstanding < best.outstanding:
            best = u
    return best


def choose_free(
    upstreams: Sequence[Upstream],
    limit: int,
    tried: list[Upstream] | None = None,
    rand: Callable[[], float] = random.random,
) -> Upstream | None:
    """:func:`choose` among the replicas serving fewer than ``limit`` requests (0: no
    limit); None when every one (untried) is at its limit."""
    up = choose(upstreams, tried, rand)
    if up is None or up.outstanding < limit or not limit:
        return up
    best: Upstream | None = None
    for u in upstreams:
        if u.outstanding >= limit or (tried and u in tried):
            continue
        # Healthy before ejected, then the least loaded.
        if best is None or (best.ejected, best.outstanding) > (u.ejected, u.outstanding):
            best = u
    return best
