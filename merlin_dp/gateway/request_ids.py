"""Request ids: what the gateway sends as ``X-Request-Id`` when a client sent none, on
either front."""

from __future__ import annotations

import itertools
import os


class RequestIds:
    """Unique request ids without a syscall or a UUID per request."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode()
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        return b"%s-%x" % (self._prefix, next(self._counter))
