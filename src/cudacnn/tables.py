"""Markdown tables and cell formatting, shared by the reports, the benchmarks and the sweeps."""

from __future__ import annotations


def md_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; a '|' inside a cell is escaped so it cannot split the cell."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
