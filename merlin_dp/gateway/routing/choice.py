"""Version choice: which version endpoint serves a request, and the counts that say so.

Both fronts call :func:`choose_version` once per request, with the target they looked up and the
request's headers (HTTP) or metadata (gRPC), so a rule means the same on either protocol:
header matches in order, then the sticky key, then the weights; the mirror copy is
decided here too. The arrival and the request in flight are counted here, where the
choice is made; each front counts the answer (and the end of the flight) itself, because
their requests end in different places.
"""

from __future__ import annotations

from random import random

from merlin_dp.gateway.metrics import CHOSEN_DIRECT, CHOSEN_WEIGHT
from merlin_dp.gateway.routing.table import (
    DIRECT_POLICY,
    WEIGHT_SLOTS,
    HeaderLookup,
    MirrorTarget,
    ModelTarget,
    RoutePolicy,
    Target,
    VersionTarget,
)

# (the version, why it was chosen: a CHOSEN_* label, its route policy, the mirror to copy
# the request to or None). A tuple: the hot path unpacks it and keeps nothing.
Choice = tuple[VersionTarget, int, RoutePolicy, MirrorTarget | None]


def choose_version(target: Target, headers: HeaderLookup) -> Choice:
    """Choose the version for one request and count its arrival."""
    if type(target) is ModelTarget:
        if target.weights_only:
            version = target.slots[int(random() * WEIGHT_SLOTS)]
            chosen = CHOSEN_WEIGHT
        else:
            version, chosen = target.route(headers)
        mirror = target.mirror
        if mirror is not None and (mirror.version is version or random() >= mirror.fraction):
            mirror = None
        policy = target.policy
    else:
        assert type(target) is VersionTarget
        version, chosen, policy, mirror = target, CHOSEN_DIRECT, DIRECT_POLICY, None
    stats = version.stats
    stats.in_flight += 1
    stats.arrivals += 1
    return version, chosen, policy, mirror
