"""Cell formats and the table frame shared by the views of `connwatch top`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table


def glyphs(unicode: bool) -> tuple[str, str]:
    """The sort mark and the direction arrow, in ASCII where the terminal has no Unicode."""
    return (" ▼", "→") if unicode else (" v", "->")


def new_table(unicode: bool) -> Table:
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD if unicode else box.ASCII2, pad_edge=False, expand=False)


def cell_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def cell_size(n: float) -> str:
    """1536 -> '1.5KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cell_duration(seconds: float) -> str:
    """Compact ages: 4.2s, 42s, 3m07s, 2h05m, 3d04h."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
