"""Shared rich output: one console for results, one for diagnostics on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


def table(title: str, columns: list[str], rows: list[list[object]]) -> Table:
    """A plain rich table of stringified cells."""
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(v) for v in r))
    return t
