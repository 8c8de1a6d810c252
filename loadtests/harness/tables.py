"""The plain-text tables the benchmarks print: rows as they come, then the summary."""

from __future__ import annotations

from collections.abc import Sequence


def fmt_number(value: float, digits: int) -> str:
    """`value` with thousands separators and `digits` decimals; "n/a" for NaN."""
    return "n/a" if value != value else f"{value:,.{digits}f}"  # NaN check


def goal_mark(met: bool) -> str:
    return "(met)" if met else "(not met)"


def format_row(cells: Sequence[str], widths: Sequence[int], left_columns: int = 1) -> str:
    """One table line: the first `left_columns` cells left-aligned, the rest right-aligned."""
    out = [
        c.ljust(w) if i < left_columns else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(out).rstrip()


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    min_widths: Sequence[int] = (),
    left_columns: int = 1,
) -> str:
    """A plain-text table with a header rule; columns as wide as their widest cell."""
    widths = [max(len(c) for c in col) for col in zip(headers, *rows, strict=True)]
    widths = [max(w, m) for w, m in zip(widths, [*min_widths, *[0] * len(widths)], strict=False)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(format_row(cells, widths, left_columns) for cells in lines)
