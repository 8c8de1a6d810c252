"""Reading replica logs from their ends: a failed version's message, and the API's
``…/versions/{version}/logs`` (its last lines, or followed like ``tail -f``)."""

from __future__ import annotations

import os
from pathlib import Path

MAX_TAIL_BYTES = 8 * 1024 * 1024  # a tail reads no more than this from the end
MAX_READ_BYTES = 1024 * 1024  # a follower reads no more than this per file per read


def log_tail(path: Path, lines: int) -> tuple[list[str], int]:
    """A log's last ``lines`` lines and the offset they end at (its size when read), from
    where a follower goes on."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos, data = end, b""
            while pos > 0 and data.count(b"\n") <= lines and end - pos < MAX_TAIL_BYTES:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except OSError:
        return [], 0
    text = data.decode("utf-8", "replace").splitlines()
    return (text[-lines:] if lines > 0 else []), end


class LogFollower:
    """Follows a version's log files like ``tail -f``: the first read gives each file's
    last ``lines`` lines, later reads what was written since (a file that appears later,
    from its start), whole lines only, under a ``==> name <==`` header whenever the file
    changes."""

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self._started = False
        self._last: Path | None = None

    def read(self, paths: list[Path]) -> str:
        out: list[str] = []
        for path in paths:
            if path not in self._offsets:
                if not self._started:
                    shown, self._offsets[path] = log_tail(path, self.lines)
                    self._emit(out, path, shown)
                    continue
                self._offsets[path] = 0
            try:
                with path.open("rb") as f:
                    f.seek(self._offsets[path])
                    new = f.read(MAX_READ_BYTES)
            except OSError:
                continue
            self._offsets[path] += len(new)
            whole, newline, rest = (self._partial.pop(path, b"") + new).rpartition(b"\n")
            if not newline:  # no line ended yet: keep it for the next read
                self._partial[path] = rest
                continue
            if rest:
                self._partial[path] = rest
            self._emit(out, path, whole.decode("utf-8", "replace").split("\n"))
        self._started = True
        return "".join(out)

    def _emit(self, out: list[str], path: Path, lines: list[str]) -> None:
        if not lines:
            return
        if path != self._last:
            gap = "" if self._last is None else "\n"
            out.append(f"{gap}==> {path.name} <==\n")
            self._last = path
        out.append("\n".join(lines) + "\n")
