"""Plain-text tables for the dry runs."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first one the header) as left-aligned columns, a line of dashes under the header.

    Example::

        >>> print(format_table([("layer", "frozen"), ("backbone.bn1", "yes")]))
        layer         frozen
        ------------  ------
        backbone.bn1  yes
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
