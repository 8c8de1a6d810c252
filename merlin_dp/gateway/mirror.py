"""What both fronts' mirrors share: their bounds, and comparing a copy's answer with the
primary's.

Equal bytes agree; otherwise, if both are JSON, they agree when they are equal with key
order ignored and numbers equal within a relative tolerance (a candidate model's floats
rarely match the primary's to the last bit). An Open Inference Protocol (KServe V2)
answer names the model and version that gave it; those two fields differ by design and
are not compared, as the gRPC mirror leaves out a response's model metadata. The HTTP
mirror compares response bodies (:func:`bodies_agree`); the gRPC mirror compares decoded
``PredictValuesResponse`` messages as JSON values (:func:`json_agree`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# What an Open Inference Protocol answer says about who gave it.
V2_IDENTITY = frozenset({"model_name", "model_version"})


@dataclass(frozen=True, slots=True)
class MirrorLimits:
    """Bounds on mirrored copies, per worker; the gRPC mirror takes the same ones."""

    max_in_flight: int = 128
    max_body_bytes: int = 256 * 1024  # request copies and the copies' answers alike


def bodies_agree(a: bytes, b: bytes, rel_tol: float) -> bool:
    """JSON-aware equality: key order ignored, numbers within ``rel_tol``; else bytes."""
    if a == b:
        return True
    try:
        left, right = json.loads(a), json.loads(b)
    except ValueError:
        return False
    if isinstance(left, dict) and isinstance(right, dict) and "outputs" in left:
        left = {k: v for k, v in left.items() if k not in V2_IDENTITY}
        right = {k: v for k, v in right.items() if k not in V2_IDENTITY}
    return json_agree(left, right, rel_tol)


def json_agree(a: Any, b: Any, rel_tol: float) -> bool:
    """Two decoded JSON values agree: the same shape, numbers within ``rel_tol``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_agree(a[k], b[k], rel_tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            json_agree(x, y, rel_tol) for x, y in zip(a, b, strict=True)
        )
    return bool(a == b)
